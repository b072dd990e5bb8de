"""Drives a running gateway with the real Python FHIR clients (fhirpy, fhirclient), as a partner would.

Run by tests/it/server/python.rs against a gateway it started:

    python interop.py --base URL --client ID --key PEM CHECK...

Each check prints `ok CHECK` or `FAIL CHECK` with the traceback; the exit status is 1 if any failed.
The token comes by SMART Backend Services, done here: the token endpoint is discovered (from
/.well-known/smart-configuration for fhirpy, from /metadata's oauth-uris for fhirclient) and an ES384
client assertion is signed with PyJWT, its `kid` the RFC 7638 thumbprint of the key, as several
client libraries name their keys.
"""

import argparse
import asyncio
import base64
import hashlib
import json
import sys
import time
import traceback
import uuid
import xml.etree.ElementTree as ET

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from fhirclient import client as fhirclient_client
from fhirclient.models.bundle import Bundle
from fhirclient.models.observation import Observation
from fhirclient.models.patient import Patient
from fhirpy import AsyncFHIRClient, SyncFHIRClient

MRN = "urn:oid:2.16.840.1.113883.3.9999.1"
FHIR_NS = "{http://hl7.org/fhir}"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint(public_key):
    """RFC 7638: base64url SHA-256 of the required members of the JWK, in lexical order, no whitespace."""
    numbers = public_key.public_numbers()
    size = (public_key.curve.key_size + 7) // 8
    members = {"crv": "P-384", "kty": "EC", "x": b64url(numbers.x.to_bytes(size, "big")), "y": b64url(numbers.y.to_bytes(size, "big"))}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


class Partner:
    """The client id, its private key, and the gateway it talks to."""

    def __init__(self, base, client_id, key_file):
        self.base = base.rstrip("/")
        self.client_id = client_id
        with open(key_file, "rb") as f:
            self.pem = f.read()
        self.kid = thumbprint(serialization.load_pem_private_key(self.pem, password=None).public_key())

    def assertion(self, token_url):
        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": token_url, "exp": now + 240, "jti": str(uuid.uuid4())}
        return jwt.encode(claims, self.pem, algorithm="ES384", headers={"kid": self.kid, "typ": "JWT"})

    def token(self, scope="system/*.cruds"):
        """SMART Backend Services: discovery, then client_credentials with a signed assertion."""
        discovery = requests.get(f"{self.base}/.well-known/smart-configuration", timeout=10)
        discovery.raise_for_status()
        config = discovery.json()
        assert "ES384" in config["token_endpoint_auth_signing_alg_values_supported"], config
        token_url = config["token_endpoint"]
        answer = requests.post(
            token_url,
            data={
                "grant_type": "client_credentials",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": self.assertion(token_url),
                "scope": scope,
            },
            timeout=10,
        )
        assert answer.status_code == 200, f"token endpoint: {answer.status_code} {answer.text}"
        body = answer.json()
        assert body["token_type"].lower() == "bearer", body
        return body["access_token"]

    def fhirpy(self):
        return SyncFHIRClient(self.base, authorization=f"Bearer {self.token()}")

    def headers(self, **extra):
        return {"Authorization": f"Bearer {self.token()}", **extra}


def patient(client, identifier, family="Pytest"):
    return client.resource("Patient", identifier=[{"system": MRN, "value": identifier}], name=[{"family": family, "given": ["Robin"]}], gender="other", birthDate="1988-11-05")


def check_get_or_create(partner):
    """fhirpy's get_or_create (a conditional create, POST Patient?identifier=…) twice: one Patient stored."""
    client = partner.fhirpy()
    search = client.resources("Patient").search(identifier=f"{MRN}|MRN-PY-GOC")
    first, created = search.get_or_create(patient(client, "MRN-PY-GOC"))
    assert created, "the first call creates"
    again, created_again = search.get_or_create(patient(client, "MRN-PY-GOC"))
    assert not created_again, "the second call finds the first"
    assert again.id == first.id, (again.id, first.id)
    assert again["meta"]["versionId"] == "1", again["meta"]
    assert search.count() == 1, "one Patient with the identifier"
    fetched = client.reference("Patient", first.id).to_resource()
    assert fetched["name"][0]["family"] == "Pytest", fetched


def check_count(partner):
    """fhirpy's count(): _count=0 with _totalMethod=count, read from Bundle.total."""
    client = partner.fhirpy()
    before = client.resources("Patient").count()
    for n in range(3):
        patient(client, f"MRN-PY-COUNT-{n}").save()
    assert client.resources("Patient").count() == before + 3
    assert client.resources("Patient").search(identifier=f"{MRN}|MRN-PY-COUNT-1").count() == 1
    assert client.resources("Patient").search(identifier=f"{MRN}|MRN-PY-NOBODY").count() == 0


def observations(client, subject, n):
    for day in range(1, n + 1):
        client.resource(
            "Observation",
            status="final",
            category=[{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "survey"}]}],
            code={"coding": [{"system": "http://loinc.org", "code": "44261-6"}], "text": "PHQ-9 total score"},
            subject={"reference": subject},
            effectiveDateTime=f"2026-04-{day:02d}T09:30:00Z",
            valueInteger=day,
        ).save()


def check_paging(partner):
    """fetch_all() follows the next links over several pages, sync and async, and so does fhirclient's perform_iter."""
    client = partner.fhirpy()
    subject = patient(client, "MRN-PY-PAGES")
    subject.save()
    observations(client, f"Patient/{subject.id}", 7)
    search = client.resources("Observation").search(patient=f"Patient/{subject.id}").sort("date").limit(3)
    first_page = search.fetch()
    assert len(first_page) == 3, len(first_page)
    everything = search.fetch_all()
    assert [o["valueInteger"] for o in everything] == list(range(1, 8)), [o["valueInteger"] for o in everything]

    async def fetch_async():
        async_client = AsyncFHIRClient(partner.base, authorization=f"Bearer {partner.token()}")
        return await async_client.resources("Observation").search(patient=f"Patient/{subject.id}").sort("-date").limit(2).fetch_all()

    newest_first = asyncio.run(fetch_async())
    assert [o["valueInteger"] for o in newest_first] == list(range(7, 0, -1)), [o["valueInteger"] for o in newest_first]


def check_post_search(partner):
    """POST /Observation/_search with a form body answers as the GET search; its paging links work."""
    client = partner.fhirpy()
    subject = patient(client, "MRN-PY-POST")
    subject.save()
    observations(client, f"Patient/{subject.id}", 4)
    answer = requests.post(
        f"{partner.base}/Observation/_search",
        data={"patient": f"Patient/{subject.id}", "_count": "3", "_sort": "date"},
        headers=partner.headers(Accept="application/fhir+json"),
        timeout=10,
    )
    assert answer.status_code == 200, f"{answer.status_code} {answer.text}"
    bundle = Bundle(answer.json())
    assert bundle.type == "searchset" and bundle.total == 4, (bundle.type, bundle.total)
    assert [e.resource.valueInteger for e in bundle.entry] == [1, 2, 3]
    assert all(isinstance(e.resource, Observation) for e in bundle.entry)
    by_get = client.resources("Observation").search(patient=f"Patient/{subject.id}").sort("date").limit(3).fetch()
    assert [e.resource.id for e in bundle.entry] == [o.id for o in by_get]
    next_url = next(link.url for link in bundle.link if link.relation == "next")
    page2 = requests.get(next_url, headers=partner.headers(Accept="application/fhir+json"), timeout=10)
    assert page2.status_code == 200, page2.text
    assert [e["resource"]["valueInteger"] for e in page2.json()["entry"]] == [4]


def check_fhirclient(partner):
    """fhirclient finds the token endpoint in /metadata (rest.security oauth-uris), gets a token with a
    client assertion (client_credentials), and its model classes parse what the gateway answers."""
    smart = fhirclient_client.FHIRClient(settings={"app_id": partner.client_id, "api_base": partner.base + "/", "scope": "system/*.cruds"})
    smart.prepare()
    server = smart.server
    assert server.capabilityStatement.fhirVersion == "4.0.1", server.capabilityStatement.fhirVersion
    token_url = server.auth._token_uri
    discovered = requests.get(f"{partner.base}/.well-known/smart-configuration", timeout=10).json()["token_endpoint"]
    assert token_url == discovered, (token_url, discovered)
    server.auth.jwt_token = partner.assertion(token_url)
    smart.authorize()
    assert smart.ready, "fhirclient holds an access token"

    created = Patient({"resourceType": "Patient", "identifier": [{"system": MRN, "value": "MRN-PY-FHIRCLIENT"}], "name": [{"family": "Modelson", "given": ["Kai"]}], "gender": "female", "birthDate": "1990-02-03"})
    answer = created.create(server)
    assert answer is not None and answer.get("id"), answer
    read = Patient.read(answer["id"], server)
    assert isinstance(read, Patient) and read.name[0].family == "Modelson" and read.birthDate.isostring == "1990-02-03", read.as_json()
    found = list(Patient.where(struct={"identifier": f"{MRN}|MRN-PY-FHIRCLIENT"}).perform_resources_iter(server))
    assert [p.id for p in found] == [answer["id"]], [p.id for p in found]
    observations(partner.fhirpy(), f"Patient/{read.id}", 5)
    pages = list(Observation.where(struct={"patient": f"Patient/{read.id}", "_count": "2"}).perform_iter(server))
    assert len(pages) == 3 and all(isinstance(p, Bundle) for p in pages), len(pages)
    assert sorted(e.resource.valueInteger for p in pages for e in p.entry) == [1, 2, 3, 4, 5]


def check_xml(partner):
    """A read as FHIR XML (Accept and _format), parsed by xml.etree as a FHIR resource."""
    client = partner.fhirpy()
    subject = patient(client, "MRN-PY-XML", family="Xmlson")
    subject.save()
    for how, url, headers in [
        ("Accept", f"{partner.base}/Patient/{subject.id}", partner.headers(Accept="application/fhir+xml")),
        ("_format", f"{partner.base}/Patient/{subject.id}?_format=xml", partner.headers()),
    ]:
        answer = requests.get(url, headers=headers, timeout=10)
        assert answer.status_code == 200, f"{how}: {answer.status_code} {answer.text[:300]}"
        assert "xml" in answer.headers.get("content-type", ""), f"{how}: content-type {answer.headers.get('content-type')}"
        root = ET.fromstring(answer.content)
        assert root.tag == f"{FHIR_NS}Patient", f"{how}: root {root.tag}"
        assert root.find(f"{FHIR_NS}id").get("value") == subject.id, how
        family = root.find(f"{FHIR_NS}name/{FHIR_NS}family")
        assert family is not None and family.get("value") == "Xmlson", how
        identifier = root.find(f"{FHIR_NS}identifier/{FHIR_NS}value")
        assert identifier is not None and identifier.get("value") == "MRN-PY-XML", how


CHECKS = {
    "get_or_create": check_get_or_create,
    "count": check_count,
    "paging": check_paging,
    "post_search": check_post_search,
    "fhirclient": check_fhirclient,
    "xml": check_xml,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the gateway's FHIR base URL")
    parser.add_argument("--client", required=True, help="the client id")
    parser.add_argument("--key", required=True, help="the client's private key (PEM)")
    parser.add_argument("checks", nargs="+", choices=sorted(CHECKS))
    args = parser.parse_args()
    partner = Partner(args.base, args.client, args.key)
    failed = []
    for name in args.checks:
        try:
            CHECKS[name](partner)
            print(f"ok {name}", flush=True)
        except Exception:
            failed.append(name)
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
    print(f"python interop: {len(args.checks) - len(failed)} ok, {len(failed)} failed {failed if failed else ''}".rstrip())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
