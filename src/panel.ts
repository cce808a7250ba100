import { Dialog, showDialog } from '@jupyterlab/apputils';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import { formatBytes, IGPU, IGPUProcess, IKernel, IOccupancy } from './api';
import { GPUModel } from './model';

/** What the panel does to a kernel: open its notebook, or shut it down (this server's kernels only). */
export interface IPanelActions {
  open(path: string): void;
  shutdown(kernel: IKernel): Promise<void>;
}

interface ISegment {
  part: 'this' | 'notebooks' | 'others' | 'free';
  label: string;
  bytes: number;
}

interface IHolder {
  kernel: IKernel | null; // null: a kernel the server could not name
  kernelId: string;
  bytes: number;
  pids: number[];
}

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className = '',
  text = ''
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text) {
    node.textContent = text;
  }
  return node;
}

function sum(values: (number | null)[]): number {
  return values.reduce<number>((total, v) => total + (v || 0), 0);
}

/** The notebooks holding memory on one GPU (a kernel and its children together), largest first. */
export function holders(gpu: IGPU, data: IOccupancy): IHolder[] {
  const byKernel = new Map<string, IHolder>();
  for (const p of gpu.processes || []) {
    if (!p.kernel) {
      continue;
    }
    const h = byKernel.get(p.kernel) || {
      kernel: data.kernels[p.kernel] || null,
      kernelId: p.kernel,
      bytes: 0,
      pids: []
    };
    h.bytes += p.memory || 0;
    h.pids.push(p.pid);
    byKernel.set(p.kernel, h);
  }
  return [...byKernel.values()].sort((a, b) => b.bytes - a.bytes);
}

/** Memory split into this notebook, other notebooks, other processes (and the driver's reserve), free. */
export function segments(
  gpu: IGPU,
  currentKernelId: string | null
): ISegment[] {
  const procs = gpu.processes || [];
  const mine = sum(
    procs
      .filter(p => p.kernel && p.kernel === currentKernelId)
      .map(p => p.memory)
  );
  const notebooks = sum(
    procs
      .filter(p => p.kernel && p.kernel !== currentKernelId)
      .map(p => p.memory)
  );
  const used = gpu.memory_used ?? mine + notebooks;
  return [
    { part: 'this', label: 'this notebook', bytes: mine },
    { part: 'notebooks', label: 'other notebooks', bytes: notebooks },
    {
      part: 'others',
      label: 'other processes',
      bytes: Math.max(used - mine - notebooks, 0)
    },
    { part: 'free', label: 'free', bytes: gpu.memory_free ?? 0 }
  ];
}

function processLabel(p: IGPUProcess): string {
  const who = p.user ? ` · ${p.user}` : '';
  return `${p.pid}${who} · ${p.command || p.name || 'n/a'}`;
}

/** The "GPUs" sidebar panel. */
export class GPUPanel extends Widget {
  constructor(model: GPUModel, actions: IPanelActions) {
    super();
    this._model = model;
    this._actions = actions;
    this.id = 'nbgpu-panel';
    this.addClass('jp-nbgpu-panel');
    this.title.caption = 'GPUs: which notebook holds which GPU';
    model.changed.connect(this._render, this);
    this._render();
  }

  dispose(): void {
    this._model.changed.disconnect(this._render, this);
    super.dispose();
  }

  protected onAfterShow(msg: Message): void {
    this._model.panelVisible = true;
  }

  protected onAfterHide(msg: Message): void {
    this._model.panelVisible = false;
  }

  protected onAfterAttach(msg: Message): void {
    this._model.panelVisible = this.isVisible;
  }

  protected onBeforeDetach(msg: Message): void {
    this._model.panelVisible = false;
  }

  private _render(): void {
    const data = this._model.occupancy;
    const root = el('div', 'jp-nbgpu-content');
    const header = el('div', 'jp-nbgpu-header');
    header.appendChild(el('span', 'jp-nbgpu-title', 'GPUs'));
    if (data?.simulated) {
      const badge = el('span', 'jp-nbgpu-simulated', 'SIMULATED');
      badge.title = `simulated GPUs (${data.simulate || ''}): not real hardware`;
      header.appendChild(badge);
    }
    const refresh = el('button', 'jp-nbgpu-refresh jp-mod-styled', '↻');
    refresh.title = 'read the GPUs again';
    refresh.onclick = () => void this._model.refresh();
    header.appendChild(refresh);
    root.appendChild(header);

    if (this._model.error) {
      root.appendChild(
        el('div', 'jp-nbgpu-error', `nbgpu server extension: ${this._model.error}`)
      );
    }
    if (!data) {
      root.appendChild(el('div', 'jp-nbgpu-note', 'Reading the GPUs…'));
      this._replace(root);
      return;
    }
    for (const note of data.notes) {
      root.appendChild(el('div', 'jp-nbgpu-note', note));
    }
    if (!data.gpus.length) {
      root.appendChild(el('div', 'jp-nbgpu-note', 'No GPU found.'));
    }
    const current = this._model.currentKernel;
    for (const gpu of data.gpus) {
      root.appendChild(this._gpu(gpu, data, current));
    }
    const when = new Date(data.time * 1000).toLocaleTimeString();
    root.appendChild(el('div', 'jp-nbgpu-time', `read at ${when}`));
    this._replace(root);
  }

  private _replace(content: HTMLElement): void {
    this.node.replaceChildren(content);
  }

  private _gpu(
    gpu: IGPU,
    data: IOccupancy,
    current: IKernel | null
  ): HTMLElement {
    const card = el('div', 'jp-nbgpu-gpu');
    card.dataset.gpu = String(gpu.index);
    // a kernel that simulates GPUs on a server showing real ones (or the reverse) sees none of these
    const sameKind = !!current && !!current.simulate === data.simulated;
    const alias = sameKind
      ? current?.visible.devices.find(d => d.gpu === gpu.index)
      : undefined;
    const head = el('div', 'jp-nbgpu-gpu-head');
    const named = gpu.name || 'n/a';
    const simulated =
      gpu.simulated && !/simulated/i.test(named) ? ' (simulated)' : '';
    const name = `GPU ${gpu.index} · ${named}${simulated}`;
    head.appendChild(el('span', 'jp-nbgpu-gpu-name', name));
    if (alias) {
      const tag = el('span', 'jp-nbgpu-alias', `cuda:${alias.cuda}`);
      tag.title = 'this notebook sees this GPU as cuda:' + alias.cuda;
      head.appendChild(tag);
    }
    card.appendChild(head);

    const bar = el('div', 'jp-nbgpu-bar');
    const total = gpu.memory_total || 0;
    const parts = segments(gpu, this._model.currentKernelId);
    for (const s of parts) {
      const seg = el('div', `jp-nbgpu-segment jp-nbgpu-segment-${s.part}`);
      seg.dataset.bytes = String(s.bytes);
      seg.style.width = total ? `${(100 * s.bytes) / total}%` : '0';
      seg.title = `${s.label}: ${formatBytes(s.bytes)}`;
      bar.appendChild(seg);
    }
    card.appendChild(bar);
    const used =
      gpu.memory_total === null
        ? 'memory n/a'
        : `${formatBytes(gpu.memory_used)} / ${formatBytes(gpu.memory_total)} used`;
    const util =
      gpu.utilization === null ? 'util n/a' : `util ${gpu.utilization}%`;
    card.appendChild(el('div', 'jp-nbgpu-figures', `${used} · ${util}`));
    const legend = el('div', 'jp-nbgpu-legend');
    for (const s of parts.filter(s => s.bytes > 0 && s.part !== 'free')) {
      const item = el('span', `jp-nbgpu-key jp-nbgpu-key-${s.part}`);
      item.textContent = `${s.label} ${formatBytes(s.bytes)}`;
      legend.appendChild(item);
    }
    card.appendChild(legend);

    if (gpu.processes === null) {
      card.appendChild(el('div', 'jp-nbgpu-note', 'process list n/a'));
      return card;
    }
    for (const h of holders(gpu, data)) {
      card.appendChild(this._holder(h));
    }
    for (const p of gpu.processes.filter(p => !p.kernel)) {
      const row = el('div', 'jp-nbgpu-process');
      row.dataset.pid = String(p.pid);
      row.appendChild(el('span', 'jp-nbgpu-what', processLabel(p)));
      row.appendChild(el('span', 'jp-nbgpu-memory', formatBytes(p.memory)));
      row.title = processLabel(p);
      card.appendChild(row);
    }
    return card;
  }

  private _holder(h: IHolder): HTMLElement {
    const k = h.kernel;
    const row = el('div', 'jp-nbgpu-notebook');
    row.dataset.kernel = h.kernelId;
    if (h.kernelId === this._model.currentKernelId) {
      row.classList.add('jp-mod-current');
    }
    const where = k?.path || `kernel ${h.kernelId.slice(0, 8)}`;
    const label = el('span', 'jp-nbgpu-what', where);
    label.title =
      `${where} · kernel ${k?.name || ''} ${h.kernelId}` +
      ` · pid ${h.pids.join(', ')}` +
      (k && !k.this_server ? ' · a kernel of another of your servers' : '');
    const line = el('div', 'jp-nbgpu-line');
    line.appendChild(label);
    line.appendChild(el('span', 'jp-nbgpu-memory', formatBytes(h.bytes)));
    row.appendChild(line);
    const actions = el('div', 'jp-nbgpu-actions');
    if (k && !k.this_server) {
      actions.appendChild(el('span', 'jp-nbgpu-note', 'another of your servers'));
    }
    if (k?.this_server) {
      if (k.path && k.session_type !== 'console') {
        const open = el('button', 'jp-nbgpu-open jp-mod-styled', 'open');
        open.title = `open ${k.path}`;
        open.onclick = () => this._actions.open(k.path as string);
        actions.appendChild(open);
      }
      const stop = el('button', 'jp-nbgpu-shutdown jp-mod-styled', 'shut down kernel');
      stop.title = 'shut down this kernel (frees its GPU memory)';
      stop.onclick = () => void this._confirmShutdown(k, stop);
      actions.appendChild(stop);
    }
    row.appendChild(actions);
    return row;
  }

  private async _confirmShutdown(
    kernel: IKernel,
    button: HTMLButtonElement
  ): Promise<void> {
    const where = kernel.path || `kernel ${kernel.id}`;
    const result = await showDialog({
      title: 'Shut down kernel?',
      body:
        `Shut down the kernel of ${where}? Its GPU memory is freed; ` +
        'its variables are lost (the notebook file is kept).',
      buttons: [
        Dialog.cancelButton(),
        Dialog.warnButton({ label: 'Shut Down' })
      ]
    });
    if (result.button.accept) {
      button.disabled = true;
      button.textContent = 'shutting down…';
      await this._actions.shutdown(kernel);
    }
  }

  private _model: GPUModel;
  private _actions: IPanelActions;
}
