"""The KV side: caches that keep, per layer and KV head, the prompt KV pairs a scorer ranks best.

Data path: a query source (`query_sources`, SpecKV's draft preview) appends voting tokens → the prefill
(`prefill`) runs the target once and, in every layer, a scorer (`scorers`) ranks the candidate keys → a selection
policy (`policies`) picks what each layer keeps → the cache layers (`layers`, `static_layers`) hold it. `cache`
is the transformers `Cache` that ties them together; `record` is what it knows of the prompt; `context` is a
retained long context served to many questions; `binding` lets a target's `generate` hand the cache its prompt.
"""
