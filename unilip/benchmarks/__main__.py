"""python -m unilip.benchmarks <name> generator=<saved generator> out=<dir> prompts=<...> [key=value ...]

Benchmarks: geneval, dpg, wise, imgedit, gedit (conf/benchmark/<name>.yaml). Overrides are Hydra's
(conf/benchmark.yaml): sampler.steps=20, sampler.guidance_scale=4.5, batch_size=8, scorer=<official checkout>.
Under torchrun the prompts are split over the processes.
"""

from __future__ import annotations

import sys

from unilip.benchmarks import BENCHMARKS
from unilip.logs import cli_logging, one_line_errors, output


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        output(__name__).info(__doc__)
        return None
    name, overrides = argv[0], argv[1:]
    cli_logging()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from unilip.benchmarks.run import run_benchmark
    from unilip.models.presets import compose_config

    with one_line_errors(OSError, ValueError, HydraException, OmegaConfBaseException):
        if name not in BENCHMARKS:
            raise ValueError(f"no benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
        cfg = compose_config("benchmark", [f"benchmark={name}", *overrides])
        results = run_benchmark(cfg)
    if results is not None and results["scores"] is None:  # rank 0, no scores yet: how to get them
        output(__name__).info(
            "%s: images in %s; score them with the official scorer:\n%s",
            name,
            cfg.out,
            "\n".join(results["score_commands"]),
        )
    return results


if __name__ == "__main__":
    main()
