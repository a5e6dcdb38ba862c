"""The ratios a benchmark measured, as rows that `research.benchmarks.all` gathers into one
table. Each benchmark prints its own details as before; with `--ratios_json=<file>` it also
writes its ratio rows there."""

from __future__ import annotations

import dataclasses
import json

from absl import flags

flags.DEFINE_string("ratios_json", None, "Also write the measured ratios to this JSON file "
                    "(research.benchmarks.all collects them).")


@dataclasses.dataclass
class Ratio:
    name: str
    value: float | None          # None: not measured (see note)
    target: str = ""             # e.g. ">= 1.0"; empty: informational
    note: str = ""


class Ratios:
    """Collects one benchmark's ratio rows and writes them where --ratios_json says."""

    def __init__(self, benchmark: str):
        self.benchmark = benchmark
        self.rows: list[Ratio] = []

    def add(self, name: str, value: float | None, target: str = "", note: str = "") -> None:
        self.rows.append(Ratio(name, None if value is None else float(value), target, note))

    def write(self, path: str | None = None) -> None:
        """To `path`, else to --ratios_json when given."""
        path = path or flags.FLAGS.ratios_json
        if path:
            with open(path, "w") as f:
                json.dump({"benchmark": self.benchmark,
                           "rows": [dataclasses.asdict(r) for r in self.rows]}, f, indent=1)


def read(path: str) -> tuple[str, list[Ratio]]:
    with open(path) as f:
        d = json.load(f)
    return d["benchmark"], [Ratio(**r) for r in d["rows"]]
