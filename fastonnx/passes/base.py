"""The one shape every fastonnx pass has.

A pass is an ``onnx_ir`` in-place pass, configured when it is made (a preset is a list of
configured passes, see :mod:`fastonnx.optimizer`). Calling it on a model returns a
:class:`Result`: onnx_ir's ``PassResult`` plus the pass's :class:`Report`, which says what the
pass changed (``counts``, changes only) and what it left alone and why (``skipped``, one
:class:`Skip` per node, shown in the optimize report).
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import onnx_ir as ir


@dataclass(frozen=True)
class Skip:
    """A node a pass left unchanged, and why."""

    node: str
    reason: str
    op_type: str = ""


@dataclass(kw_only=True)
class Report:
    """What one pass did. Subclasses add their details and define ``counts``."""

    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """How many of each change the pass made (what it left alone is in ``skipped``)."""
        raise NotImplementedError

    @property
    def changed(self) -> bool:
        return any(self.counts.values())


@dataclass
class Result(ir.passes.PassResult):
    report: Report = dataclasses.field(default_factory=Report)


class Pass(ir.passes.InPlacePass):
    """A fastonnx pass: ``run`` rewrites the model in place and returns its report."""

    name: ClassVar[str]

    @abc.abstractmethod
    def run(self, model: ir.Model) -> Report: ...

    def call(self, model: ir.Model) -> Result:
        report = self.run(model)
        return Result(model, report.changed, report)


__all__ = ["Pass", "Report", "Result", "Skip"]
