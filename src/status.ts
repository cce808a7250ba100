import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import { IKernel } from './api';
import { GPUModel } from './model';

/** 'cuda:0 → GPU 2, cuda:1 → GPU 3' for a kernel, as it sees the GPUs now. */
export function describe(kernel: IKernel | null, gpuCount: number): string {
  if (!kernel) {
    return '';
  }
  const v = kernel.visible;
  if (v.from === 'unknown') {
    return 'GPUs: unknown';
  }
  if (!v.devices.length) {
    return gpuCount ? 'no GPU' : '';
  }
  if (v.devices.length > 3) {
    const all = v.value === null && v.devices.length === gpuCount;
    const which = v.devices.map(d => d.gpu).join(',');
    return all ? `all ${gpuCount} GPUs` : `${v.devices.length} GPUs (${which})`;
  }
  return v.devices.map(d => `cuda:${d.cuda} → GPU ${d.gpu}`).join(', ');
}

/** The status bar item: the current notebook's GPUs. Clicking it opens the GPU panel. */
export class GPUStatus extends Widget {
  constructor(model: GPUModel, openPanel: () => void) {
    super();
    this._model = model;
    this.addClass('jp-nbgpu-status');
    this.node.onclick = openPanel;
    model.changed.connect(this._render, this);
    this._render();
  }

  dispose(): void {
    this._model.changed.disconnect(this._render, this);
    super.dispose();
  }

  protected onAfterShow(msg: Message): void {
    this._model.statusVisible = true;
  }

  protected onAfterHide(msg: Message): void {
    this._model.statusVisible = false;
  }

  protected onAfterAttach(msg: Message): void {
    this._model.statusVisible = this.isVisible;
  }

  private _render(): void {
    const data = this._model.occupancy;
    const kernel = this._model.currentKernel;
    const text = data ? describe(kernel, data.gpus.length) : '';
    const sim = (kernel?.simulate || data?.simulated) && text ? ' (simulated)' : '';
    this.node.textContent = text ? `${text}${sim}` : 'GPUs';
    this.node.title = kernel
      ? `GPUs of ${kernel.path || 'this kernel'}: CUDA_VISIBLE_DEVICES=` +
        `${kernel.visible.value ?? 'unset (all GPUs)'}` +
        (kernel.visible.from === 'environment'
          ? ' (from the kernel start)'
          : '') +
        ' · click for the GPU panel'
      : 'GPU panel';
  }

  private _model: GPUModel;
}
