"""Amazon Bedrock's InvokeModel as a strict mock: POST /model/{modelId}/invoke, signed with AWS Signature V4.

The signature is verified as AWS does, with botocore's own signer: the request is rebuilt from the headers it
signed, its body and its X-Amz-Date, signed again with the secret key of the access key it names (`aws_keys`), and
the two signatures compared; the scope must name this region and service "bedrock", the date be within 5 minutes.
Titan Text Embeddings v2 (amazon.titan-embed-text-v2:0) takes inputText, dimensions (256, 512, 1024), normalize
and embeddingTypes, one text per call, and counts its tokens (`inputTextTokenCount`); Cohere's models take Cohere's
body without `model`. Both send the X-Amzn-Bedrock-Input-Token-Count header. Errors are `{"message"}` with the
exception in x-amzn-ErrorType.
"""

from __future__ import annotations

import datetime
import hmac
from typing import Any

from aiohttp import web

from .cohere import FIELDS as COHERE_FIELDS
from .cohere import check_cohere_body
from .common import (
    PROVIDER_SETTINGS,
    PROVIDER_STATE,
    ProviderMockSettings,
    Refused,
    check_dimensions,
    check_fields,
    embed,
    endpoint,
    json_answer,
    model_of,
    new_app,
)

TITAN_FIELDS = ("inputText", "dimensions", "normalize", "embeddingTypes")
_ERRORS = {400: "ValidationException", 403: "AccessDeniedException", 404: "ResourceNotFoundException",
           408: "ModelTimeoutException", 424: "ModelErrorException", 429: "ThrottlingException",
           500: "InternalServerException", 503: "ServiceUnavailableException"}
MAX_SKEW = datetime.timedelta(minutes=5)


def error(exc: Refused) -> web.Response:
    name = exc.headers.pop("x-error", None) or _ERRORS.get(exc.status, "InternalServerException")
    return json_answer({"message": exc.message}, {"x-amzn-ErrorType": f"{name}:http://internal.amazon.com/coral/"
                                                  "com.amazon.bedrock/", **exc.headers}, exc.status)


def _denied(message: str, name: str = "InvalidSignatureException") -> Refused:
    return Refused(403, message, {"x-error": name})


def check_signature(request: web.Request, raw: bytes) -> None:
    """Verify the request's SigV4 signature with botocore, as Bedrock would."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    settings = request.app[PROVIDER_SETTINGS]
    auth = request.headers.get("Authorization", "")
    fields = dict(p.strip().split("=", 1) for p in auth.removeprefix("AWS4-HMAC-SHA256 ").split(",") if "=" in p)
    if not auth.startswith("AWS4-HMAC-SHA256 ") or set(fields) != {"Credential", "SignedHeaders", "Signature"}:
        raise _denied("Missing Authentication Token", "MissingAuthenticationTokenException")
    key_id, date, region, service, terminal = (fields["Credential"].split("/") + [""] * 5)[:5]
    if key_id not in settings.aws_keys:
        raise _denied("The security token included in the request is invalid.", "UnrecognizedClientException")
    stamp = request.headers.get("X-Amz-Date", "")
    try:
        when = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        raise _denied("X-Amz-Date is missing or malformed.", "IncompleteSignatureException") from None
    if abs(datetime.datetime.now(datetime.UTC) - when) > MAX_SKEW:
        raise _denied("Signature expired: the request's date is more than 5 minutes away.")
    if (date, region, service, terminal) != (stamp[:8], settings.region, "bedrock", "aws4_request"):
        raise _denied("Credential should be scoped to a valid region and service bedrock.")
    signed = fields["SignedHeaders"].split(";")
    if "host" not in signed or "x-amz-date" not in signed:
        raise _denied("Host and X-Amz-Date must be signed.", "IncompleteSignatureException")
    token = request.headers.get("X-Amz-Security-Token")
    rebuilt = AWSRequest(method=request.method, url=f"http://{request.host}{request.raw_path}", data=raw,
                         headers={h: request.headers.get(h, "") for h in signed})
    rebuilt.context["timestamp"] = stamp
    signer = SigV4Auth(Credentials(key_id, settings.aws_keys[key_id], token), "bedrock", settings.region)
    expected = signer.signature(signer.string_to_sign(rebuilt, signer.canonical_request(rebuilt)), rebuilt)
    if not hmac.compare_digest(expected, fields["Signature"]):
        raise _denied("The request signature we calculated does not match the signature you provided.")


async def _invoke(request: web.Request, body: dict[str, Any]) -> web.Response:
    settings, state = request.app[PROVIDER_SETTINGS], request.app[PROVIDER_STATE]
    name = request.match_info["model"]
    spec = model_of(settings, name)
    if name.startswith("cohere."):
        texts, input_type, dims, truncate = check_cohere_body(body, spec, tuple(f for f in COHERE_FIELDS
                                                                                 if f != "model"))
        vectors, tokens = embed(state, settings, name, texts, input_type, dims, truncate)
        doc: dict[str, Any] = {"id": "mock", "embeddings": {"float": [v.tolist() for v in vectors]},
                               "response_type": "embeddings_by_type", "texts": texts}
    else:
        check_fields(body, TITAN_FIELDS, ("inputText",))
        if not isinstance(body["inputText"], str) or not body["inputText"]:
            raise Refused(400, "Malformed input request: inputText must be a non-empty string")
        if body.get("embeddingTypes", ["float"]) != ["float"]:
            raise Refused(400, "Malformed input request: this mock answers embeddingTypes [\"float\"] only")
        dims = check_dimensions(spec, body.get("dimensions"), "dimensions")
        vectors, tokens = embed(state, settings, name, [body["inputText"]], None, dims, False)
        doc = {"embedding": vectors[0].tolist(), "embeddingsByType": {"float": vectors[0].tolist()},
               "inputTextTokenCount": tokens[0]}
    return json_answer(doc, {"X-Amzn-Bedrock-Input-Token-Count": str(sum(tokens))})


def create_app(settings: ProviderMockSettings) -> web.Application:
    app = new_app(settings)
    app.router.add_post("/model/{model}/invoke", endpoint(_invoke, error, check_signature))
    return app
