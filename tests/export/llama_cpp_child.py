"""Runs a GGUF file in llama.cpp (llama-cpp-python) in its own process and prints JSON:
the tokenization of a text, the logits of every prompt position, and a greedy
continuation. Tests run it as a child so a crash in native code is a failed test.

usage: python llama_cpp_child.py '{"model": PATH, "text": STR, "ids": [..], "n_gen": N}'
"""

import json
import sys

import llama_cpp
import llama_cpp.llama_cpp as C
import numpy as np

_default_params = C.llama_model_default_params


def _no_extra_bufts():
    # llama.cpp's AMX weight repacking segfaults on q8_0/q4_K with more than one token per
    # call on these CPUs (shared/notes/gguf-llama-cpp.md); plain CPU buffers avoid it.
    params = _default_params()
    params.use_extra_bufts = False
    return params


def main() -> None:
    args = json.loads(sys.argv[1])
    C.llama_model_default_params = _no_extra_bufts
    # One thread: llama.cpp's spinning workers crawl on a busy 2-core machine.
    llm = llama_cpp.Llama(model_path=args["model"], n_ctx=256, n_batch=256, logits_all=True, verbose=False,
                          n_threads=1, n_threads_batch=1, seed=0)
    out = {"tokens": llm.tokenize(args["text"].encode("utf-8"), add_bos=True, special=False)}
    ids = list(args["ids"])
    llm.eval(ids)
    out["logits"] = np.asarray(llm.scores[: len(ids)], dtype=np.float64).tolist()
    generated = []
    for _ in range(args["n_gen"]):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        generated.append(nxt)
        llm.eval([nxt])
    out["generated"] = generated
    out["metadata"] = {k: v for k, v in llm.metadata.items() if k.startswith(("general.", "tokenizer.ggml.pre"))}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
