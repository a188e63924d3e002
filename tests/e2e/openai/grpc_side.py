"""The gRPC side of the OpenAI e2e test (test_openai.mjs calls it): greedy text for a prompt, and
API-key checks on gRPC metadata. Prints one JSON object.
Usage: grpc_side.py ADDR greedy KEY PROMPT MAX_TOKENS
       grpc_side.py ADDR keys USER_KEY ADMIN_KEY"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import grpc  # noqa: E402
import grpc_client as gc  # noqa: E402

addr, what = sys.argv[1], sys.argv[2]
cl = gc.Client(addr)


def code_of(fn):
    try:
        fn()
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


if what == "greedy":
    key, prompt, n = sys.argv[3], sys.argv[4], int(sys.argv[5])
    req = cl.request(text=prompt, max_tokens=n, temperature=0.0)
    text, ids = "", []
    for r in cl.generate_stream(req, metadata=[("authorization", "Bearer " + key)]):
        if r.WhichOneof("kind") == "chunk":
            text += r.chunk.text
            ids.extend(r.chunk.token_ids)
    print(json.dumps({"text": text, "ids": list(ids)}))
elif what == "keys":
    user, admin = sys.argv[3], sys.argv[4]
    req = cl.request(text="Hi", max_tokens=2)

    def gen(md):
        return lambda: list(cl.generate_stream(req, metadata=md))

    def set_policy(md):
        return lambda: cl.admin.SetCompressionPolicy(
            gc.pb.SetCompressionPolicyRequest(policy="full"), timeout=30, metadata=md)

    out = {
        "none": code_of(gen(None)),
        "wrong": code_of(gen([("authorization", "Bearer wrong-key-123")])),
        "user": code_of(gen([("authorization", "Bearer " + user)])),
        "x_api_key": code_of(gen([("x-api-key", user)])),
        "admin_with_user_key": code_of(set_policy([("authorization", "Bearer " + user)])),
        "admin_with_admin_key": code_of(set_policy([("authorization", "Bearer " + admin)])),
        "health_open": code_of(lambda: cl.health.Check(gc.hpb.HealthCheckRequest(), timeout=10)),
    }
    print(json.dumps(out))
