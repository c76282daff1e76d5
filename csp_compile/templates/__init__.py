"""What the rewrite emits for a layer's selection: ``prefill_selection`` (traced into the prefill graph
for Inductor, or run eagerly in ``csp::select_reference``), and which of the two a policy gets
(``choose_scoring``). ``naive_scores`` is the authors' full L x L scoring, a benchmark baseline."""

from csp_compile.templates.lowering import ScoringChoice, choose_scoring
from csp_compile.templates.naive_scoring import naive_scores
from csp_compile.templates.prefill_selection import kept_slots, prefill_selection

__all__ = ["ScoringChoice", "choose_scoring", "kept_slots", "naive_scores", "prefill_selection"]
