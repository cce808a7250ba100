import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, showErrorMessage } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { Kernel } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { Signal } from '@lumino/signaling';

import { IKernel, shutdownKernel } from './api';
import { GPUModel } from './model';
import { GPUPanel } from './panel';
import { GPUStatus } from './status';

const ICON_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M7 7h10v10H7z" fill-opacity=".35"/>
    <path d="M5 5h14v14H5zm2 2v10h10V7zM9 1h2v3H9zm4 0h2v3h-2zM9 20h2v3H9zm4 0h2v3h-2zM1 9h3v2H1zm0 4h3v2H1zm19-4h3v2h-3zm0 4h3v2h-3z"/>
  </g>
</svg>`;

const gpuIcon = new LabIcon({ name: 'nbgpu:gpu', svgstr: ICON_SVG });

const COMMAND = 'nbgpu:open-panel';
const REFRESH_AFTER_IDLE = 1000; // ms after the current notebook's kernel goes idle (it may have run %gpus)

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'nbgpu:panel',
  description:
    'A GPU panel (which notebook holds which GPU) and the current notebook\'s GPUs in the status bar.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ILabShell, IStatusBar, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    labShell: ILabShell | null,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null
  ) => {
    const model = new GPUModel(app.serviceManager.serverSettings);

    const panel = new GPUPanel(model, {
      open: path => void app.commands.execute('docmanager:open', { path }),
      shutdown: async (kernel: IKernel) => {
        try {
          await shutdownKernel(model.settings, kernel.id);
        } catch (reason) {
          await showErrorMessage('Could not shut down the kernel', `${reason}`);
        }
        await Promise.all([
          app.serviceManager.sessions.refreshRunning(),
          app.serviceManager.kernels.refreshRunning(),
          model.refresh()
        ]);
      }
    });
    panel.title.icon = gpuIcon;
    app.shell.add(panel, 'left', { rank: 250 });

    app.commands.addCommand(COMMAND, {
      label: 'Show the GPU panel',
      caption: 'which notebook holds which GPU',
      execute: () => app.shell.activateById(panel.id)
    });
    palette?.addItem({ command: COMMAND, category: 'GPUs' });

    // "this notebook": the kernel of the current notebook
    const activeChanged = new Signal<GPUModel, void>(model);
    let idleTimer = 0;
    let watched: Kernel.IKernelConnection | null = null;
    const onStatus = (_: Kernel.IKernelConnection, status: Kernel.Status) => {
      if (status === 'idle') {
        window.clearTimeout(idleTimer);
        idleTimer = window.setTimeout(() => void model.refresh(), REFRESH_AFTER_IDLE);
      }
    };
    const follow = () => {
      const kernel = tracker.currentWidget?.sessionContext.session?.kernel ?? null;
      if (watched !== kernel) {
        watched?.statusChanged.disconnect(onStatus);
        kernel?.statusChanged.connect(onStatus);
        watched = kernel;
      }
      model.currentKernelId = kernel?.id ?? null;
      activeChanged.emit();
    };
    tracker.currentChanged.connect((_, notebook) => {
      notebook?.sessionContext.kernelChanged.connect(follow);
      follow();
    });
    tracker.widgetAdded.connect((_, notebook) =>
      notebook.sessionContext.kernelChanged.connect(follow)
    );
    follow();

    if (statusBar) {
      const item = new GPUStatus(model, () => app.shell.activateById(panel.id));
      statusBar.registerStatusItem('nbgpu:status', {
        item,
        align: 'left',
        rank: 5,
        isActive: () => model.currentKernelId !== null,
        activeStateChanged: activeChanged
      });
    }
    labShell?.layoutModified.connect(() => {
      model.panelVisible = panel.isVisible;
    });
  }
};

export default plugin;
