"""The prompt side: preprocessors that hand the target a shorter prompt (SpecPC and the prompt-compression
baselines): a token scorer ranks the prompt's tokens, a token selector keeps the best within the budget."""
