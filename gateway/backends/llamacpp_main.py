"""The child process of an embedded backend: llama.cpp's server from the ``xllamacpp`` wheel,
which offers only a Python API (``Server(CommonParams)`` serving from background threads).

    python -m gateway.backends.llamacpp_main '{"model": "...", "port": 8081, ...}'

Exits on SIGTERM (the default action), as the gateway stops it, and by itself when the
gateway that started it is gone.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    settings = json.loads(sys.argv[1])
    import xllamacpp  # an optional dependency: only this child needs it

    params = xllamacpp.CommonParams()
    params.model.path = settings["model"]
    params.hostnames = ["127.0.0.1"]
    params.port = settings["port"]
    params.n_ctx = settings["context_size"]
    params.n_parallel = settings["parallel"]
    params.cpuparams.n_threads = settings["threads"]
    params.cpuparams_batch.n_threads = settings["threads"]
    params.use_jinja = True
    # /v1/embeddings too (chat answers the same with it on); a mean of the tokens' vectors,
    # since the endpoint refuses a chat model's own pooling, none.
    params.embedding = True
    params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    # An input is embedded in one batch: as large as a slot's context, not 512 tokens.
    params.n_batch = params.n_ubatch = settings["context_size"] // settings["parallel"]
    params.model_alias = {settings["alias"]}
    server = xllamacpp.Server(params)  # returns once the model is loaded and serving
    print(f"llama.cpp serving {settings['alias']} on {server.listening_address}", flush=True)
    parent = settings["parent"]
    while os.getppid() == parent:  # the gateway died without stopping us: go with it
        time.sleep(1)


if __name__ == "__main__":
    main()
