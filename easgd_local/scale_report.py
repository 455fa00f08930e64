"""The scale sweep's table (markdown) and plot (efficiency against p), from its result."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COLUMNS = ("stripes", "size", "p", "tau", "step ms", "exch/s", "lock held", "wait mean ms",
           "wait p99 ms", "exchange share", "efficiency", "model: efficiency", "model: wait ms",
           "model: rho lock / cpu")


def _ms(seconds: float | None) -> str:
    return "inf" if seconds is None or seconds == float("inf") else f"{1000 * seconds:.1f}"


def _row(pt: dict[str, Any]) -> list[str]:
    m = pt["predicted"]
    return [str(pt["stripes"]), pt["size"], str(pt["p"]), str(pt["tau"]), f"{pt['step_ms']:g}",
            f"{pt['exchanges_per_second']:.1f}", f"{100 * pt['lock_held_share']:.1f}%",
            _ms(pt["wait_mean"]), _ms(pt["wait_p99"]), f"{100 * pt['exchange_share']:.1f}%",
            f"{pt['efficiency']:.3f}", f"{m['efficiency']:.3f}", _ms(m["wait_mean"]),
            f"{m['rho_lock']:.2f} / {m['rho_cpu']:.2f}"]


def markdown_table(result: dict[str, Any]) -> str:
    """The header facts (cores, load, the exchange alone per size), then one row per point."""
    load = result.get("load_average_before") or []
    after = result.get("load_average_after") or []
    opts = result["options"]
    paced = (f", copies paced to {opts['copy_gbps']:g} GB/s" if opts.get("copy_gbps") else "")
    lines = [f"Device {opts['device']} (host side of an exchange: {opts['host']}{paced}), "
             f"{result['cores']} cores; load average (1, 5, 15 min) before {', '.join(f'{x:.2f}' for x in load) or '?'}"
             + (f", after {', '.join(f'{x:.2f}' for x in after)}" if after else "") + ".", ""]
    for size, alone in result["alone"].items():
        lines.append(f"- {size}: one exchange alone {_ms(alone['exchange_seconds'])} ms, of "
                     f"which the locked addition {_ms(alone['held_seconds'])} ms"
                     + (f"; pinned copies {alone['h2d_gbps']:.1f} GB/s to the GPU, "
                        f"{alone['d2h_gbps']:.1f} GB/s back" if "h2d_gbps" in alone else ""))
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_row(pt)) + " |" for pt in result["points"]]
    for skipped in result.get("skipped", []):
        lines.append(f"| {skipped['stripes']} | {skipped['size']} | {skipped['p']} | "
                     f"{skipped['tau']} | {skipped['step_ms']:g} | skipped: {skipped['why']} |"
                     + " |" * (len(COLUMNS) - 6))
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> bool:
    """Efficiency against p: one panel per (stripes, step time), one line per (size, tau),
    the model dotted in the same colour. False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s", path.name)
        return False
    points = result["points"]
    stripes = sorted({pt["stripes"] for pt in points})
    steps = sorted({pt["step_ms"] for pt in points})
    if not points:
        return False
    fig, axes = plt.subplots(len(stripes), len(steps), squeeze=False, sharey=True,
                             figsize=(4.5 * len(steps), 3.5 * len(stripes)))
    for i, s in enumerate(stripes):
        for j, step in enumerate(steps):
            ax = axes[i][j]
            here = [pt for pt in points if pt["stripes"] == s and pt["step_ms"] == step]
            for k, key in enumerate(sorted({(pt["size"], pt["tau"]) for pt in here})):
                line = sorted((pt for pt in here if (pt["size"], pt["tau"]) == key),
                              key=lambda pt: pt["p"])
                ps = [pt["p"] for pt in line]
                colour = f"C{k}"
                ax.plot(ps, [pt["efficiency"] for pt in line], "o-", color=colour,
                        label=f"{key[0]}, tau {key[1]}")
                ax.plot(ps, [pt["predicted"]["efficiency"] for pt in line], ":", color=colour)
            ax.set_xscale("log", base=2)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{s} stripe(s), {step:g} ms steps")
            ax.set_xlabel("workers p")
            ax.set_ylabel("efficiency (steps / wall)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
