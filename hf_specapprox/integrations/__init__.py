"""Where hf_specapprox meets the tools around it: the method registry, the `speckv-text-generation` pipeline, the
draft-agreement monitor and SpecPC in front of an OpenAI-compatible server."""
