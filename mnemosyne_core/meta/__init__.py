"""Meta-training: estimators (ES, PES, truncated backprop), the ticket/result
protocol between driver and workers, and the in-process meta-trainer.

Modules: :mod:`.protocol` (Ticket, PairResult, Evaluator), :mod:`.noise`
(seed-only ε), :mod:`.config` (TOML configs), :mod:`.learned` (which learned
optimizer is meta-trained), :mod:`.unroll` (inner training), :mod:`.evaluator`
(``evaluate_tickets``, ``LocalEvaluator``), :mod:`.es`, :mod:`.pes`,
:mod:`.backprop` (estimators), :mod:`.trainer` (the loop, checkpoints, metrics).
"""
from mnemosyne_core.meta.protocol import (
    Evaluator,
    PairResult,
    ProtocolError,
    Status,
    Ticket,
)

__all__ = ["Evaluator", "PairResult", "ProtocolError", "Status", "Ticket"]
