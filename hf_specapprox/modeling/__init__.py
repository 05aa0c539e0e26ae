"""How hf_specapprox reaches into the user's models: PEFT wrappers (`adapters`), tensor-parallel ranks
(`distributed`), the attention observer that hands a layer's post-RoPE queries and keys to a scorer (`capture`), and
the draft's checks and answer preview (`draft`)."""
