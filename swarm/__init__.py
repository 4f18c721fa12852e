"""The swarm contract: everything that block servers, clients and the gateway agree on.

Layers, bottom up:
  ids        -- NewType ids and the uid grammar for model spans
  errors     -- the one error tree (codes travel on the wire; ``retryable`` drives failover)
  config     -- ModelSpec: the family-agnostic shape of a model, read from a Hugging Face config
  weights    -- model references -> local safetensors folders; loading only the tensors asked for
  head       -- the client-side pieces of a model (embeddings, final norm, LM head), pure torch
  sampling   -- pure token-sampling functions shared by the HF-style API and the gateway
  tensors    -- the one tensor codec (hivemind's serializer)
  messages   -- RPC metadata models with a protocol version
  records    -- DHT records (server announcements), decoded tolerantly
  identity   -- records tied to their writer: signed with the key the peer id hashes, checked by every reader
  routing    -- pure choice of a chain of servers that covers every block
  dht        -- announce / look up records in a hivemind DHT
  spot_check -- recompute a share of steps on a second server; ban a server caught returning wrong outputs
  client     -- async inference sessions and forward passes over a route
  span_tensors -- per-block trainables (deep prompts, LoRA factors) that travel with span requests
  remote_autograd -- remote blocks as a differentiable function (rpc_forward / rpc_backward hop by hop)
  lora       -- client-side LoRA factors for remote blocks, saved and loaded in PEFT format
  tuning     -- tuning modes (ptune, deep_ptune, lora), prompts save/load, and the causal-LM loss
  model      -- AutoDistributedModelForCausalLM, a Hugging Face style front end

The package imports no web framework; ``gateway`` and ``server`` both depend on it, never on each other.
"""

PROTOCOL_VERSION = 1
