"""A real gRPC client for uncompd (Debian's python3-grpcio). Stubs are generated at import time
into a temporary folder from the repository's .proto files (protoc + grpc_python_plugin), so the
client always matches the tree it tests.

Usage as a library:
    import grpc_client as gc
    cl = gc.Client("127.0.0.1:50051")
    for r in cl.generate(text="Once upon a time", max_tokens=16): ...
Usage from the command line (a quick manual check):
    /usr/bin/python3 tests/e2e/grpc_client.py 127.0.0.1:50051 "Once upon a time"
"""
import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
PROTO_DIR = os.path.join(REPO, "proto")
PROTOS = ["uncomp/v1/uncomp.proto", "grpc/health/v1/health.proto"]


def _gen_stubs():
    out = tempfile.mkdtemp(prefix="uncomp_stubs_")
    atexit.register(shutil.rmtree, out, True)
    plugin = shutil.which("grpc_python_plugin") or "/usr/bin/grpc_python_plugin"
    cmd = ["protoc", "-I", PROTO_DIR, "--plugin=protoc-gen-grpc_python=" + plugin,
           "--python_out=" + out, "--grpc_python_out=" + out] + PROTOS
    subprocess.run(cmd, check=True)
    # protoc writes packages without __init__.py; Python 3 namespace packages handle that, but
    # "grpc" would shadow the grpcio package: move the health stubs to a private name.
    hdir = os.path.join(out, "grpc", "health", "v1")
    os.makedirs(os.path.join(out, "uc_health"), exist_ok=True)
    for f in ("health_pb2.py", "health_pb2_grpc.py"):
        src = open(os.path.join(hdir, f)).read()
        src = src.replace("from grpc.health.v1 import health_pb2",
                          "from uc_health import health_pb2")
        open(os.path.join(out, "uc_health", f), "w").write(src)
    shutil.rmtree(os.path.join(out, "grpc"))
    sys.path.insert(0, out)
    return out


STUB_DIR = _gen_stubs()
from uncomp.v1 import uncomp_pb2 as pb  # noqa: E402
from uncomp.v1 import uncomp_pb2_grpc as pb_grpc  # noqa: E402
from uc_health import health_pb2 as hpb  # noqa: E402
from uc_health import health_pb2_grpc as hpb_grpc  # noqa: E402


class Client:
    """Stubs for the three services over one channel (TLS when root_cert, PEM bytes, is given;
    the server name is then checked against `server_name`)."""

    def __init__(self, target, timeout=30.0, root_cert=None, server_name=None):
        self.target = target
        self.timeout = timeout
        if root_cert is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=root_cert)
            opts = [("grpc.ssl_target_name_override", server_name)] if server_name else []
            self.channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(target)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self.health = hpb_grpc.HealthStub(self.channel)

    def close(self):
        self.channel.close()

    # -- inference ------------------------------------------------------------------------
    @staticmethod
    def request(text=None, token_ids=None, request_id="", sampling=None, compression=None,
                add_special_tokens=None, **kw):
        """Builds a GenerateRequest; extra keywords go to SamplingParams."""
        req = pb.GenerateRequest(request_id=request_id)
        if text is not None:
            req.text = text
        if token_ids is not None:
            req.token_ids.ids.extend(token_ids)
        sp = sampling if sampling is not None else pb.SamplingParams()
        for k, v in kw.items():
            if k == "temperature":
                sp.has_temperature = True
            if k == "seed":
                sp.has_seed = True
            if isinstance(v, (list, tuple)):
                getattr(sp, k).extend(v)
            else:
                setattr(sp, k, v)
        req.sampling.CopyFrom(sp)
        if compression is not None:
            req.compression.CopyFrom(compression if isinstance(compression, pb.CompressionParams)
                                     else pb.CompressionParams(**compression))
        if add_special_tokens is not None:
            req.has_add_special_tokens = True
            req.add_special_tokens = add_special_tokens
        return req

    def generate_stream(self, req, timeout=None, metadata=None):
        return self.inference.Generate(req, timeout=timeout or self.timeout, metadata=metadata)

    def generate(self, req=None, timeout=None, **kw):
        """Runs a request to the end; returns (token_ids, text, complete, chunks)."""
        if req is None:
            req = self.request(**kw)
        ids, text, complete, chunks = [], "", None, 0
        for r in self.generate_stream(req, timeout=timeout):
            if r.WhichOneof("kind") == "chunk":
                chunks += 1
                ids.extend(r.chunk.token_ids)
                text += r.chunk.text
            else:
                complete = r.complete
        return ids, text, complete, chunks

    def chat(self, messages, n=0, request_id="", timeout=None, metadata=None, **kw):
        """Inference.Chat with [(role, content), ...]; extra keywords go to SamplingParams.
        Returns the response stream."""
        g = self.request(text="", **kw)
        req = pb.ChatRequest(request_id=request_id, n=n, sampling=g.sampling)
        for role, content in messages:
            req.messages.add(role=role, content=content)
        return self.inference.Chat(req, timeout=timeout or self.timeout, metadata=metadata)

    def tokenize(self, text, add_special_tokens=True):
        return self.inference.Tokenize(pb.TokenizeRequest(text=text,
                                                          add_special_tokens=add_special_tokens),
                                       timeout=self.timeout)

    def detokenize(self, ids, skip_special_tokens=False):
        return self.inference.Detokenize(
            pb.DetokenizeRequest(token_ids=ids, skip_special_tokens=skip_special_tokens),
            timeout=self.timeout).text

    def abort(self, request_id):
        return self.inference.Abort(pb.AbortRequest(request_id=request_id),
                                    timeout=self.timeout).found

    # -- admin ----------------------------------------------------------------------------
    def server_info(self):
        return self.admin.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout)

    def model_info(self):
        return self.admin.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout)

    def stats(self, section=""):
        return self.admin.GetStats(pb.GetStatsRequest(section=section), timeout=self.timeout)

    def profile(self):
        return self.admin.GetCompressionProfile(pb.GetCompressionProfileRequest(),
                                                timeout=self.timeout)

    def set_policy(self, **kw):
        return self.admin.SetCompressionPolicy(pb.SetCompressionPolicyRequest(**kw),
                                               timeout=self.timeout)

    def calibrate(self, text="", window_tokens=0, max_windows=0, timeout=120.0):
        return self.admin.Calibrate(pb.CalibrateRequest(text=text, window_tokens=window_tokens,
                                                        max_windows=max_windows),
                                    timeout=timeout)

    def drain(self, timeout_ms=0, timeout=60.0):
        return self.admin.Drain(pb.DrainRequest(timeout_ms=timeout_ms), timeout=timeout)

    # -- health ---------------------------------------------------------------------------
    def check(self, service="", timeout=None):
        return self.health.Check(hpb.HealthCheckRequest(service=service),
                                 timeout=timeout or self.timeout).status

    def watch(self, service="", timeout=None):
        return self.health.Watch(hpb.HealthCheckRequest(service=service), timeout=timeout)

    # -- raw bytes ------------------------------------------------------------------------
    def raw_unary(self, method, payload, timeout=None):
        """Sends arbitrary bytes to a unary method (e.g. '/uncomp.v1.Inference/Tokenize')."""
        fn = self.channel.unary_unary(method, request_serializer=None,
                                      response_deserializer=None)
        return fn(payload, timeout=timeout or self.timeout)

    def raw_stream(self, method, payload, timeout=None):
        fn = self.channel.unary_stream(method, request_serializer=None,
                                       response_deserializer=None)
        return list(fn(payload, timeout=timeout or self.timeout))


SERVING = hpb.HealthCheckResponse.SERVING
NOT_SERVING = hpb.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = hpb.HealthCheckResponse.SERVICE_UNKNOWN


def main(argv):
    target = argv[1] if len(argv) > 1 else "127.0.0.1:50051"
    text = argv[2] if len(argv) > 2 else "Once upon a time"
    cl = Client(target)
    print("health:", hpb.HealthCheckResponse.ServingStatus.Name(cl.check()))
    for r in cl.generate_stream(cl.request(text=text, max_tokens=32, temperature=0.0)):
        if r.WhichOneof("kind") == "chunk":
            sys.stdout.write(r.chunk.text)
            sys.stdout.flush()
        else:
            print("\n--", r.complete)
    cl.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
