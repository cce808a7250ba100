"""IPython magics: argument parsing and display only; each one calls the plain function of the same job.

    %gpus                                   the GPU table
    %gpus 2,3 | GPU-<uuid>,... | MIG-<uuid> | none | all
    %gpus --auto 2 [--min-free 20GiB] [--max-util 10]
    %gpus --simulate 4x24GiB | 4xL4 | 2xA100-80GB:nvlink | off
    %gpus --topo                            the links between GPUs, as `nvidia-smi topo -m`
    %gpu_monitor [--interval 1] [--history 300] [--temperature] [--power] | stop
"""

from __future__ import annotations

from IPython.core.magic_arguments import argument, magic_arguments

from . import checks, devices, gpu_table, visibility
from .errors import UsageError


def _parse(magic, line: str, name: str):
    """The magic's arguments (IPython's magic_arguments parser); a bad line is one nbgpu UsageError."""
    from IPython.core.error import UsageError as IPythonUsageError

    words = checks.shell_words(line, name)
    if "-h" in words or "--help" in words:
        raise UsageError(magic.parser.format_help())
    try:
        return magic.parser.parse_args(words)
    except IPythonUsageError as err:
        raise UsageError(f"{err}\n{magic.parser.format_usage()}") from None


@magic_arguments(name="gpus")
@argument("selection", nargs="?", help="2,3 | GPU-<uuid>,... | MIG-<uuid> | none | all")
@argument("--auto", type=int, metavar="N", help="the N least-loaded GPUs that meet the limits")
@argument("--min-free", metavar="SIZE", help="with --auto: at least this much free memory (20GiB)")
@argument("--max-util", type=float, metavar="PCT", help="with --auto: at most this utilisation (%%)")
@argument("--simulate", metavar="SPEC", help="4xL4, 2xA100-80GB:nvlink, 2xL4:pcie, 4x24GiB, 24GiB,80GiB, or off")
@argument("--topo", action="store_true", help="the links between GPUs, as `nvidia-smi topo -m`")
def gpus_magic(line: str):
    """Show the GPUs, or choose which ones this kernel sees (before CUDA starts). Returns the GPU table, the links
    between GPUs (--topo), or the new cuda:N mapping."""
    args = _parse(gpus_magic, line, "%gpus")
    if args.topo and (args.selection is not None or args.auto is not None):
        raise UsageError("--topo shows the links between GPUs; choose GPUs in a second `%gpus` call")
    if args.simulate is not None:
        if args.selection is not None or args.auto is not None:
            raise UsageError("--simulate replaces the inventory; choose GPUs in a second `%gpus` call")
        devices.simulate(args.simulate)
        return devices.topology() if args.topo else gpu_table.gpus()
    if (args.min_free is not None or args.max_util is not None) and args.auto is None:
        raise UsageError("--min-free and --max-util go with --auto N, e.g. `%gpus --auto 2 --min-free 20GiB`")
    if args.topo:
        return devices.topology()
    if args.selection is None and args.auto is None:
        return gpu_table.gpus()
    return visibility.use(args.selection, auto=args.auto, min_free=args.min_free, max_util=args.max_util)


@magic_arguments(name="gpu_monitor")
@argument("action", nargs="?", choices=["stop"], help="stop the running monitor")
@argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
@argument("--history", type=int, default=300, help="samples kept (default 300)")
@argument("--temperature", action="store_true", help="also plot temperature")
@argument("--power", action="store_true", help="also plot power draw")
def gpu_monitor_magic(line: str):
    """A live view of GPU memory and utilisation in this notebook (`stop` ends it)."""
    from . import monitoring

    args = _parse(gpu_monitor_magic, line, "%gpu_monitor")
    if args.action == "stop":
        return monitoring.stop_all()
    return monitoring.monitor(interval=args.interval, history=args.history,
                              temperature=args.temperature, power=args.power)


def _show_errors(fn):
    """Run a magic; a UsageError shows as IPython's one-line usage error (no traceback) and stops "run all"."""

    def magic(line: str = "", cell: str | None = None):
        from IPython.core.error import UsageError as IPythonUsageError

        try:
            return fn(line)
        except UsageError as err:
            raise IPythonUsageError(f"nbgpu: {err}") from None

    magic.__doc__ = fn.__doc__
    return magic


def register(ipython) -> None:
    ipython.register_magic_function(_show_errors(gpus_magic), "line", "gpus")
    ipython.register_magic_function(_show_errors(gpu_monitor_magic), "line", "gpu_monitor")
