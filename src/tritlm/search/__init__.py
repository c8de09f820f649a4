"""Per-layer bit-width search under a size budget (``tritlm search``): units and their real packed
sizes (:mod:`.units`), sensitivities (:mod:`.sensitivity`), the multiple-choice knapsack
(:mod:`.knapsack`), one search (:mod:`.plan`), the spec file (:mod:`.spec`), the Pareto table and
plot (:mod:`.pareto`) and a short fine-tune of the pick (:mod:`.finetune`)."""
