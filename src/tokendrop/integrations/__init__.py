"""tokendrop inside other tools. Each module imports its tool and is imported only by that tool (or a test).

- `tokendrop.integrations.lmms_eval`: the `tokendrop` model of lmms-eval (`lmms-eval --model tokendrop ...`).
"""
