"""TLS and mutual TLS on both edges, with certificates made here (a throwaway CA, a server
certificate for 127.0.0.1 and a client certificate): gRPC through a secure channel, HTTP
through the official ``openai`` client on an httpx client that trusts the CA."""

from __future__ import annotations

import datetime
import ipaddress
import ssl

import grpc
import httpx
import pytest
from cryptography import x509  # the dev extra installs it: a missing one is a failure
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from router import convert
from router.config import RouterConfig, TLSConfig
from tests.router.conftest import MAX_MODEL_LEN, REPLY_TEXT, Stack, make_backend


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool = False,
          usage=None, ip: str | None = None):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name or x509.Name([
                   x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Files: ca.pem, server.pem/server.key (for IP 127.0.0.1), client.pem/client.key."""
    out = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("splitserve test CA", ca_key, None, None, ca=True)
    files = {"ca.pem": ca.public_bytes(serialization.Encoding.PEM)}
    for name, usage, ip in (("server", ExtendedKeyUsageOID.SERVER_AUTH, "127.0.0.1"),
                            ("client", ExtendedKeyUsageOID.CLIENT_AUTH, None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key, ca.subject, ca_key, usage=usage, ip=ip)
        files[f"{name}.pem"] = cert.public_bytes(serialization.Encoding.PEM)
        files[f"{name}.key"] = _pem_key(key)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out


def _stack(tokenizer, pki, mutual: bool) -> Stack:
    tls = TLSConfig(str(pki / "server.pem"), str(pki / "server.key"),
                    str(pki / "ca.pem") if mutual else None)
    config = RouterConfig(model_name="fake-model", max_model_len=MAX_MODEL_LEN, tls=tls)
    return Stack(make_backend(tokenizer), tokenizer, config)


def _grpc_generate(stack: Stack, credentials) -> str:
    channel = (grpc.secure_channel(stack.grpc_address, credentials) if credentials
               else grpc.insecure_channel(stack.grpc_address))
    with channel:
        request = convert.build_request("hello", model="", request_id="", stream=False,
                                        sampling={"max_tokens": 64})
        replies = list(convert.GenerationStub(channel).Generate(request, timeout=5))
    return "".join(convert.chunk_from_proto(r).text for r in replies)


def _openai_complete(stack: Stack, verify) -> str:
    import openai
    base = f"https://127.0.0.1:{stack.http.port}/v1"
    with httpx.Client(verify=verify, timeout=5) as http:
        client = openai.OpenAI(base_url=base, api_key="unused", http_client=http,
                               max_retries=0)
        return client.completions.create(model="fake-model", prompt="hello",
                                          max_tokens=64).choices[0].text


def _trusting(pki, with_client_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if with_client_cert:
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return ctx


def test_tls_serves_grpc_and_openai_http_to_clients_that_trust_the_ca(tokenizer, pki):
    stack = _stack(tokenizer, pki, mutual=False)
    try:
        ca = (pki / "ca.pem").read_bytes()
        assert _grpc_generate(stack, grpc.ssl_channel_credentials(ca)) == REPLY_TEXT
        assert _openai_complete(stack, _trusting(pki, False)) == REPLY_TEXT
        with pytest.raises(grpc.RpcError) as plain:  # plaintext is not served any more
            _grpc_generate(stack, None)
        assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{stack.http.port}/health", timeout=5)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"https://127.0.0.1:{stack.http.port}/health", timeout=5,
                      verify=ssl.create_default_context())  # a client not trusting the CA
    finally:
        stack.close()


def test_mutual_tls_needs_a_client_certificate_signed_by_the_client_ca(tokenizer, pki):
    stack = _stack(tokenizer, pki, mutual=True)
    try:
        ca = (pki / "ca.pem").read_bytes()
        client = grpc.ssl_channel_credentials(ca, (pki / "client.key").read_bytes(),
                                              (pki / "client.pem").read_bytes())
        assert _grpc_generate(stack, client) == REPLY_TEXT
        assert _openai_complete(stack, _trusting(pki, True)) == REPLY_TEXT
        with pytest.raises(grpc.RpcError):
            _grpc_generate(stack, grpc.ssl_channel_credentials(ca))  # no client certificate
        with pytest.raises(Exception):  # noqa: B017 - the handshake fails, any way it says so
            _openai_complete(stack, _trusting(pki, False))
    finally:
        stack.close()


def test_tls_config_names_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cert file .*missing.pem"):
        TLSConfig(str(tmp_path / "missing.pem"), str(tmp_path / "missing.key"))
