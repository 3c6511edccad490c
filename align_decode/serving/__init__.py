"""Serving: sampling engines for the sequence-level methods (`engines`: vLLM) and the vLLM
logits-processor plugin that serves token-level guidance (`vllm_plugin`). Importing it never imports
vLLM."""
