"""omnimini-vl: the default text model (SmolLM2-135M-Instruct, frozen) plus omnimini's own vision encoder and
projector, trained LLaVA-style by omnimini's pipeline (dense encoder pre-training, then image-grounded chat with
the LM frozen), so the default served model sees while text-only requests answer exactly as before."""
