"""The exported chat model as an MLflow pyfunc model: prompts in, replies out.

MLflow's "models from code": the export stage logs this file with the model (`python_model=<this
path>`, the Hugging Face directory models/hf as the artifact `hf`), and `mlflow.pyfunc.load_model`
runs it, so loading needs mlflow, torch and transformers, not nanopipe. It loads the directory through
transformers (`trust_remote_code`: the architecture travels in the directory), renders each prompt
with the model's own chat template as one user turn, and generates the assistant's reply up to
`<|assistant_end|>` (the export's eos) or `max_new_tokens`.

    model = mlflow.pyfunc.load_model(model_uri)
    model.predict(["Who are you?"], params={"max_new_tokens": 64})   # -> ["I'm nanochat ..."]

Input: a list of strings (or a one-column DataFrame of them). Params: `max_new_tokens` (default
128), `temperature` (0 = greedy, the default; above 0 samples with `top_k`, default 50).
"""
from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class ChatModel(PythonModel):
    def load_context(self, context) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["hf"]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()

    def predict(self, context, model_input, params=None) -> list[str]:
        import torch

        params = params or {}
        if hasattr(model_input, "columns"):  # a DataFrame (what MLflow's schema enforcement hands over)
            columns = list(model_input.columns)
            if "prompt" not in columns and len(columns) != 1:
                raise ValueError(f"expected one column of prompts (or a 'prompt' column), got columns {columns}")
            prompts = [str(p) for p in model_input["prompt" if "prompt" in columns else columns[0]]]
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = [str(p) for p in model_input]
        max_new_tokens = int(params.get("max_new_tokens", 128))
        temperature = float(params.get("temperature", 0.0))
        if max_new_tokens < 1 or temperature < 0:
            raise ValueError(f"max_new_tokens must be >= 1 and temperature >= 0, got {max_new_tokens}, {temperature}")
        sampling = {"do_sample": True, "temperature": temperature, "top_k": int(params.get("top_k", 50))} \
            if temperature > 0 else {"do_sample": False}
        replies = []
        for prompt in prompts:
            inputs = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                        return_dict=True, return_tensors="pt")
            with torch.no_grad():
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **sampling)
            replies.append(self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        return replies


mlflow.models.set_model(ChatModel())
