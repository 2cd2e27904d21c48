"""The lifecycle stages, one module per DVC stage, named exactly as in dvc.yaml.

Each module declares PARAMS (its `params:` in dvc.yaml) and `run(st)`; the stage contract
(`nanopipe.stage`) runs it. `chat` is the one command that is not a DVC stage (interactive).
"""
NAMES = ("download", "tokenizer", "tok_eval", "pretrain", "base_eval", "sft", "rl", "chat_eval", "export", "report", "serve", "lm_eval",
         "chat")
