"""TLS between the tiers: the contexts every listener and every client of a process uses.

With `tls` on in the configuration, every listener of the project (binary
protocol, HTTP, the web tier, SMTP) speaks TLS with the process's certificate
(`tls_cert_file`, `tls_key_file`), and every connection the process opens to
another tier verifies the server against `tls_ca_file` (the cell's CA; empty:
the system's trust store). With `tls_mutual` on as well, listeners of the binary
protocol accept only clients presenting a certificate the CA signed, and this
process's clients present their own (docs/security.md).

May import: nothing of pyserver (the configuration is passed in as its fields).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TierTls", "make_dev_certificates"]


@dataclass(frozen=True, slots=True)
class TierTls:
    """A process's certificate, the CA it trusts, and whether peers must prove themselves."""

    cert_file: str
    key_file: str
    ca_file: str = ""
    mutual: bool = False

    def server_context(self, *, require_client_cert: bool | None = None) -> ssl.SSLContext:
        """For a listener: this process's certificate; with `mutual` (or when asked), a
        client must present a certificate signed by the CA."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        required = self.mutual if require_client_cert is None else require_client_cert
        if required:
            if not self.ca_file:
                raise ValueError("mutual TLS needs tls_ca_file (the CA of client certificates)")
            context.load_verify_locations(cafile=self.ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        """For a connection to another tier: the server's certificate checked against the
        CA, and its name against the address dialled; with `mutual`, ours presented."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.mutual:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_dev_certificates(
    folder: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> TierTls:
    """A throwaway CA and one certificate it signs for `names`, written to `folder`
    (ca.pem, cert.pem, key.pem; the key 0600): for clusters on one machine and tests.
    A deployment brings certificates from its own CA."""
    import trustme  # only the tools that make throwaway CAs need it

    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="pyserver dev CA")
    issued = ca.issue_cert(*names)
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    issued.cert_chain_pems[0].write_to_path(str(cert_file))
    key_file.touch(mode=0o600)
    issued.private_key_pem.write_to_path(str(key_file))
    return TierTls(str(cert_file), str(key_file), str(ca_file), mutual=True)
