"""Text generation over the swarm: prompts -> token ids -> the token loop -> text, stop strings, logprobs.

protocols     -- what the gateway needs from a swarm client, its sessions and a model head
model         -- LoadedModel: tokenizer + head + limits of one served model, and the default loader
tokenization  -- chat template rendering, prompt encoding, incremental detokenization
stops         -- stop strings, with held-back text that could still become one
token_text    -- per-token strings and bytes for logprobs (cached)
constraint    -- grammar-constrained decoding (llguidance): JSON schemas -> per-step token masks
tool_format   -- tools, tool calls and tool results in prompts; calls read back from generated text
generator     -- the token loop: one swarm session of batch n, yields ChoiceUpdates
pump          -- runs a generation in its own task so that a stream can report errors before it starts
"""
