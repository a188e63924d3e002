#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_grpc_request (tests/fuzz/corpus/fuzz_grpc_request/): one or more
valid messages per gRPC method, each behind its selector byte (grpc_codec.h's method order), and
the HTTP bodies (selectors 14 and 15). Protobuf encoded by hand, so no generated code is needed.

    tests/fuzz/make_grpc_request_seeds.py
"""
import json
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "fuzz_grpc_request")

(GENERATE, TOKENIZE, DETOKENIZE, ABORT, SERVER_INFO, MODEL_INFO, STATS, PROFILE, SET_POLICY,
 CALIBRATE, DRAIN, HEALTH_CHECK, HEALTH_WATCH, CHAT, HTTP_COMPLETIONS, HTTP_CHAT) = range(16)


def varint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def vint(field, v):
    return varint(field << 3) + varint(v)


def f32(field, v):
    return varint(field << 3 | 5) + struct.pack("<f", v)


def f64(field, v):
    return varint(field << 3 | 1) + struct.pack("<d", v)


def ld(field, data):
    if isinstance(data, str):
        data = data.encode()
    return varint(field << 3 | 2) + varint(len(data)) + data


def packed(field, values):
    return ld(field, b"".join(varint(v) for v in values))


def sampling():
    return (vint(1, 16) + vint(2, 2) + f32(3, 0.7) + vint(4, 1) + f32(5, 0.9) + vint(6, 40) +
            f32(7, 0.05) + f32(8, 1.1) + f32(9, 0.5) + f32(10, -0.5) + ld(11, "end") +
            ld(11, "x\0y") + packed(12, [2, 13]) + vint(13, 7) + vint(14, 1) + vint(15, 1) +
            vint(16, 3))


def compression(policy="uncomp-stage"):
    return (ld(1, policy) + vint(2, 64) + vint(3, 8) + vint(4, 7) + vint(5, 4) + vint(6, 2) +
            ld(7, "evict") + ld(8, "prompt") + packed(9, [2, 5]) + f32(10, 0.3))


SEEDS = {
    "gen_text": (GENERATE, ld(1, "r-1") + ld(2, "Once upon a time") + ld(4, sampling()) +
                 ld(5, compression()) + vint(6, 1) + vint(7, 1) + vint(8, 2)),
    "gen_ids": (GENERATE, ld(3, packed(1, [1, 200, 300, 4095])) + ld(4, vint(1, 4)) +
                ld(5, compression("snapkv"))),
    "tokenize": (TOKENIZE, ld(1, "Hello, world \u00e9") + vint(2, 1)),
    "detokenize": (DETOKENIZE, packed(1, [1, 1504, 3186, 4095]) + vint(2, 1)),
    "abort": (ABORT, ld(1, "r-1")),
    "server_info": (SERVER_INFO, b""),
    "model_info": (MODEL_INFO, b""),
    "stats": (STATS, ld(1, "kv")),
    "profile": (PROFILE, b""),
    "set_policy": (SET_POLICY, ld(1, "snapkv") + vint(2, 32) + ld(3, "append") +
                   ld(4, "profile")),
    "calibrate": (CALIBRATE, ld(1, "Some calibration text.") + vint(2, 256) + vint(3, 2)),
    "drain": (DRAIN, vint(1, 5000)),
    "health_check": (HEALTH_CHECK, ld(1, "uncomp.v1.Inference")),
    "health_watch": (HEALTH_WATCH, ld(1, "")),
    "chat": (CHAT, ld(1, "c-1") + ld(4, sampling()) + ld(5, compression("snapkv")) +
             vint(8, 2) + ld(9, ld(1, "system") + ld(2, "Be brief.")) +
             ld(9, ld(1, "user") + ld(2, "Tell me a story"))),
    "http_completions": (HTTP_COMPLETIONS, json.dumps({
        "model": "uncomp-tiny", "prompt": ["Once upon a time", [1, 200, 300]], "max_tokens": 8,
        "temperature": 0.5, "top_p": 0.9, "top_k": 40, "seed": 3, "stop": ["\n", "end"],
        "stop_token_ids": [2], "n": 2, "logprobs": 2, "echo": True, "stream": True,
        "stream_options": {"include_usage": True},
        "uncomp": {"policy": "uncomp", "kv_budget": 64, "stage_starts": [2, 5], "r_min": 0.3},
    }).encode()),
    "http_chat": (HTTP_CHAT, json.dumps({
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_completion_tokens": 8, "logprobs": True, "top_logprobs": 2,
        "add_generation_prompt": True, "chat_template_kwargs": {"x": 1},
    }).encode()),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name in os.listdir(OUT):
        os.remove(os.path.join(OUT, name))
    for name, (sel, body) in SEEDS.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(bytes([sel]) + body)
    print("%d seeds in %s" % (len(SEEDS), OUT))


if __name__ == "__main__":
    main()
