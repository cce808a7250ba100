import { ServerConnection } from '@jupyterlab/services';
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import { fetchOccupancy, IKernel, IOccupancy } from './api';

/** Seconds between polls while the panel is shown, and while only the status bar item is. */
export const PANEL_INTERVAL = 3000;
export const STATUS_INTERVAL = 15000;

/**
 * The latest reading of the server extension, shared by the panel and the status bar item.
 *
 * It polls only while the browser tab is visible and someone shows the data: every few seconds while the panel
 * is visible, rarely while only the status bar item is. `refresh()` asks at once (after a shutdown, or when the
 * current notebook's kernel went idle: it may have just run `%gpus 2,3`).
 */
export class GPUModel {
  constructor(settings: ServerConnection.ISettings) {
    this._settings = settings;
    this._poll = new Poll<void, Error>({
      factory: () => this._fetch(),
      frequency: { interval: STATUS_INTERVAL, backoff: true, max: 60000 },
      name: 'nbgpu:occupancy',
      standby: () =>
        document.visibilityState === 'hidden' ||
        (!this._panelVisible && !this._statusVisible)
    });
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get occupancy(): IOccupancy | null {
    return this._occupancy;
  }

  get error(): string | null {
    return this._error;
  }

  get settings(): ServerConnection.ISettings {
    return this._settings;
  }

  /** The kernel shown as "this notebook" (the current notebook's kernel). */
  get currentKernelId(): string | null {
    return this._currentKernelId;
  }

  set currentKernelId(id: string | null) {
    if (id !== this._currentKernelId) {
      this._currentKernelId = id;
      this._changed.emit();
    }
  }

  get currentKernel(): IKernel | null {
    const id = this._currentKernelId;
    return (id && this._occupancy?.kernels[id]) || null;
  }

  set panelVisible(visible: boolean) {
    if (visible === this._panelVisible) {
      return;
    }
    this._panelVisible = visible;
    this._poll.frequency = {
      ...this._poll.frequency,
      interval: visible ? PANEL_INTERVAL : STATUS_INTERVAL
    };
    if (visible) {
      void this.refresh();
    }
  }

  set statusVisible(visible: boolean) {
    if (visible !== this._statusVisible) {
      this._statusVisible = visible;
      if (visible) {
        void this.refresh();
      }
    }
  }

  refresh(): Promise<void> {
    return this._poll.refresh();
  }

  dispose(): void {
    this._poll.dispose();
  }

  private async _fetch(): Promise<void> {
    try {
      this._occupancy = await fetchOccupancy(this._settings);
      this._error = null;
    } catch (reason) {
      this._error = `${reason}`;
      this._changed.emit();
      throw reason; // the poll backs off
    }
    this._changed.emit();
  }

  private _settings: ServerConnection.ISettings;
  private _poll: Poll<void, Error>;
  private _occupancy: IOccupancy | null = null;
  private _error: string | null = null;
  private _currentKernelId: string | null = null;
  private _panelVisible = false;
  private _statusVisible = false;
  private _changed = new Signal<this, void>(this);
}
