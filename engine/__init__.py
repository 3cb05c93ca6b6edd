"""splitserve's model-execution core: one engine that both pools run.

    from engine import Engine, SamplingParams
    eng = Engine.from_pretrained(model_dir, dtype="float32", device="cpu")
    outs = eng.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0.0))
"""

from engine.sampling_params import SamplingParams

__all__ = ["Engine", "SamplingParams", "RequestOutput"]


def __getattr__(name: str):
    # Lazy: importing `engine` for SamplingParams (router, cluster) must not import torch.
    if name == "Engine":
        from engine.llm_engine import Engine

        return Engine
    if name == "RequestOutput":
        from engine.outputs import RequestOutput

        return RequestOutput
    raise AttributeError(name)
