import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** A process on a GPU, named by the server extension (nbgpu.occupancy). */
export interface IGPUProcess {
  pid: number;
  name: string | null;
  memory: number | null; // bytes
  kernel: string | null; // id of the kernel it is, or descends from
  child: boolean;
  command: string | null;
  user: string | null;
}

export interface IGPU {
  index: number;
  name: string | null;
  uuid: string | null;
  memory_total: number | null;
  memory_used: number | null;
  memory_free: number | null;
  utilization: number | null;
  simulated: boolean;
  processes: IGPUProcess[] | null;
}

export interface IKernel {
  id: string;
  name: string | null;
  path: string | null;
  pid: number | null;
  session_type: string | null;
  execution_state: string | null;
  user: string | null;
  this_server: boolean;
  simulate: string | null;
  visible: {
    value: string | null;
    order: string | null;
    from: 'kernel' | 'environment' | 'unknown';
    devices: { cuda: number; gpu: number }[];
  };
}

export interface IOccupancy {
  time: number;
  backend: string;
  simulated: boolean;
  simulate: string | null;
  message: string | null;
  gpus: IGPU[];
  kernels: { [id: string]: IKernel };
  notes: string[];
}

async function request(
  path: string,
  settings: ServerConnection.ISettings,
  init: RequestInit = {}
): Promise<Response> {
  const url = URLExt.join(settings.baseUrl, 'nbgpu', 'api', path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new ServerConnection.NetworkError(error as TypeError);
  }
  if (!response.ok) {
    const text = await response.text();
    let message = text;
    try {
      message = JSON.parse(text).message || text;
    } catch {
      // not JSON: keep the text
    }
    throw new ServerConnection.ResponseError(response, message);
  }
  return response;
}

/** Every GPU with its processes named, and the GPUs each kernel sees. */
export async function fetchOccupancy(
  settings: ServerConnection.ISettings
): Promise<IOccupancy> {
  const response = await request('gpus', settings);
  return (await response.json()) as IOccupancy;
}

/** Shut down a kernel of this server (and its notebook session). */
export async function shutdownKernel(
  settings: ServerConnection.ISettings,
  kernelId: string
): Promise<void> {
  await request(`kernels/${encodeURIComponent(kernelId)}`, settings, {
    method: 'DELETE'
  });
}

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

/** Bytes as nbgpu prints them: GiB with one decimal, MiB below 1 GiB. */
export function formatBytes(bytes: number | null): string {
  if (bytes === null || bytes === undefined) {
    return 'n/a';
  }
  if (Math.abs(bytes) >= GiB) {
    return `${(bytes / GiB).toFixed(1)} GiB`;
  }
  return `${Math.round(bytes / MiB)} MiB`;
}
