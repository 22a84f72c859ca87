"""Shared test fixtures, and the tiers: every test is marked by its directory (unit, integration, e2e)."""

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config, items) -> None:
    root = Path(__file__).parent
    for item in items:
        tier = Path(item.fspath).relative_to(root).parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


_TIE_WEIGHTS: list = []  # transformers' own PreTrainedModel.tie_weights, once seen


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item) -> None:
    """Fail the test that leaves weight tying disabled process-wide (two model loads overlapping in
    threads: services/common/hf_models.py) and put the method back, instead of failing a later, unrelated
    test that builds a tied model."""
    if "transformers.modeling_utils" not in sys.modules:
        return
    from transformers.modeling_utils import PreTrainedModel

    from services.common.hf_models import tying_intact

    if tying_intact():
        _TIE_WEIGHTS[:] = [PreTrainedModel.__dict__["tie_weights"]]
        return
    if _TIE_WEIGHTS:
        PreTrainedModel.tie_weights = _TIE_WEIGHTS[0]
    pytest.fail(f"{item.nodeid} left PreTrainedModel.tie_weights replaced (overlapping model loads)")


@pytest.fixture(scope="session")
def tiny_toy_budget() -> dict:
    """A ToyConfig budget that exercises `opd toy prepare` end to end in seconds (models learn nothing)."""
    return dict(
        n_train=60,
        n_eval=12,
        hidden_size=64,
        num_heads=2,
        num_layers=1,
        intermediate_size=128,
        batch_size=8,
        teacher_steps=6,
        student_steps=4,
        warmup_steps=2,
        eval_max_new_tokens=48,
        threads=1,
    )


@dataclass(frozen=True)
class TLSFiles:
    ca_file: str  # PEM of the CA that signed the server certificate (what clients trust)
    cert_file: str  # server certificate chain for 127.0.0.1 and localhost
    key_file: str  # its private key
    other_ca_file: str  # an unrelated CA: clients trusting only it must refuse the server


def _write_certs(directory: Path) -> TLSFiles:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca(cn: str):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(key, hashes.SHA256())
        )
        return key, cert

    ca_key, ca_cert = ca("opd test CA")
    _, other_cert = ca("some other CA")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files = TLSFiles(
        *(str(directory / n) for n in ("ca.pem", "server.pem", "server-key.pem", "other-ca.pem"))
    )
    Path(files.ca_file).write_bytes(ca_cert.public_bytes(pem))
    Path(files.cert_file).write_bytes(cert.public_bytes(pem))
    Path(files.key_file).write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    Path(files.other_ca_file).write_bytes(other_cert.public_bytes(pem))
    return files


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> TLSFiles:
    """A CA, a server certificate it signed for 127.0.0.1/localhost, and an unrelated CA (made per session)."""
    return _write_certs(tmp_path_factory.mktemp("tls"))
