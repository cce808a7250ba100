"""A plan in other engines' terms, each checked against that engine's own rules at a named version.

ktransformers  KTransformers v0.4.1 optimize rules (YAML)            ktransformers_rules(plan)
vllm           vLLM 0.33.0 engine arguments and `vllm serve` command  vllm(plan)
mlc            MLC-LLM v0.20.0 `mlc_llm serve` overrides             mlc(plan)
openllm        an OpenLLM recipe (vLLM under BentoML)                 openllm(plan)

A plan an engine cannot take is refused with a UsageError that names the engine's limit and what to change.
"""
