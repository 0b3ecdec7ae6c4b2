"""Azure ML through Event Grid: payloads built and sent by the real azure-eventgrid SDK (Event
Grid schema and CloudEvents), CloudEvents structured/binary/batch from the cloudevents
package, the SubscriptionValidation and OPTIONS handshakes, and the shared secret."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from modelcd.domain import Source as Kind
from modelcd.sources import Accepted, HookRequest, Ignored, Registered, Respond, get_source
from modelcd.sources.base import Source, batch_id
from tests.sources.conftest import AZURE_SECRET, NOW, WRONG, HookServer, make_settings, refused

eventgrid = pytest.importorskip("azure.eventgrid")
ce_http = pytest.importorskip("cloudevents.core.bindings.http")
ce_v1 = pytest.importorskip("cloudevents.core.v1.event")

REGISTERED = "Microsoft.MachineLearningServices.ModelRegistered"
WORKSPACE = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/ws"
DATA = {"ModelName": "churn", "ModelVersion": "3", "ModelTags": {"deploy": "true", "stage": "candidate"},
        "ModelProperties": {}}
EXPECTED = Registered(Kind.AZUREML, "churn", "3", "models/churn:3", f"azureml:{WORKSPACE}/models/churn/versions/3",
                      {"deploy": "true", "stage": "candidate"}, dedup_key=f"azureml:{WORKSPACE}/models/churn:3")


@pytest.fixture
def source(tmp_path: Path) -> Source:
    return get_source("azureml", make_settings(tmp_path))


@pytest.fixture
def publish(hook_server: Callable[[Source], HookServer], source: Source) -> Iterator[Callable[..., HookServer]]:
    """Send events with the SDK's EventGridPublisherClient to a loopback hook server."""
    from azure.core.credentials import AzureKeyCredential
    from azure.core.exceptions import HttpResponseError

    hook = hook_server(source)
    hook.accepted_status = 200
    clients: list[Any] = []

    def send(events: list[Any], code: str | None = AZURE_SECRET) -> HookServer:
        url = hook.url + (f"?code={code}" if code else "")
        client = eventgrid.EventGridPublisherClient(url, AzureKeyCredential("topic-key"))
        clients.append(client)
        try:
            client.send(events)
        except HttpResponseError:  # the SDK raises on anything but 200; the server recorded the answer
            pass
        return hook

    yield send
    for client in clients:
        client.close()


def _eventgrid_event(event_type: str = REGISTERED, data: Any = None, subject: str = "models/churn:3") -> Any:
    return eventgrid.EventGridEvent(subject=subject, event_type=event_type, data=DATA if data is None else data,
                                    data_version="", topic=WORKSPACE)


def _validation_data(code: str) -> dict[str, str]:
    """SubscriptionValidationEventData serialised the SDK's way (its fields are read-only)."""
    try:
        from azure.eventgrid._legacy._generated.models import SubscriptionValidationEventData
    except ImportError:  # the model moved: the wire names are documented
        return {"validationCode": code, "validationUrl": "https://rp-eastus.eventgrid.azure.net:553/validate?x"}
    data = SubscriptionValidationEventData()
    data.validation_code = code
    data.validation_url = "https://rp-eastus.eventgrid.azure.net:553/eventsubscriptions/modelcd/validate?id=1"
    return data.serialize(keep_readonly=True)


def test_eventgrid_schema_model_registered(publish: Callable[..., HookServer]) -> None:
    hook = publish([_eventgrid_event()])
    [(req, result)] = hook.seen
    assert isinstance(result, Accepted)
    assert result.delivery_id == json.loads(req.body)[0]["id"]
    assert "aeg-sas-key" not in result.kept_headers and result.kept_headers["content-type"].startswith(
        "application/json")
    assert req.query["code"] == AZURE_SECRET
    assert hook.source.normalise(req.body, result.kept_headers) == [EXPECTED]


def test_model_version_may_be_a_number(publish: Callable[..., HookServer]) -> None:
    hook = publish([_eventgrid_event(data={**DATA, "ModelVersion": 3})])
    [(req, result)] = hook.seen
    [event] = hook.source.normalise(req.body, result.kept_headers)
    assert isinstance(event, Registered) and event.external_version == "3"


def test_eventgrid_batch_is_one_delivery(publish: Callable[..., HookServer]) -> None:
    hook = publish([_eventgrid_event(), _eventgrid_event("Microsoft.MachineLearningServices.RunCompleted",
                                                         {"ExperimentName": "x"}, "experiments/x/runs/1")])
    [(req, result)] = hook.seen
    ids = [e["id"] for e in json.loads(req.body)]
    assert isinstance(result, Accepted) and result.delivery_id == batch_id(ids)
    registered, ignored = hook.source.normalise(req.body, result.kept_headers)
    assert registered == EXPECTED
    assert isinstance(ignored, Ignored) and "RunCompleted" in ignored.reason


def test_sdk_cloudevents_batch(publish: Callable[..., HookServer]) -> None:
    from azure.core.messaging import CloudEvent

    hook = publish([CloudEvent(source=WORKSPACE, type=REGISTERED, data=DATA, subject="models/churn:3")])
    [(req, result)] = hook.seen
    assert req.header("content-type").startswith("application/cloudevents-batch+json")
    assert isinstance(result, Accepted)
    assert hook.source.normalise(req.body, result.kept_headers) == [EXPECTED]


def test_subscription_validation_answers_the_code(publish: Callable[..., HookServer]) -> None:
    hook = publish([_eventgrid_event(eventgrid.SystemEventNames.EventGridSubscriptionValidationEventName,
                                     _validation_data("512d38b6-c7b8-40c8-89fe-f46f9e9622b6"), "")])
    [(_, result)] = hook.seen
    assert isinstance(result, Respond) and result.status == 200
    assert json.loads(result.body) == {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}


@pytest.mark.parametrize("code", [None, WRONG])
def test_subscription_validation_needs_the_secret(publish: Callable[..., HookServer], code: str | None) -> None:
    hook = publish([_eventgrid_event(eventgrid.SystemEventNames.EventGridSubscriptionValidationEventName,
                                     _validation_data("512d38b6"), "")], code=code)
    [(_, result)] = hook.seen
    assert isinstance(result, Exception) and result.http_status == 401
    assert "512d38b6" not in result.message and WRONG not in result.message
    assert "MODELCD_HOOKS_AZUREML_SECRET" in result.message


def test_secret_in_a_delivery_property_header(source: Source) -> None:
    body = json.dumps([{"id": "e1", "subject": "models/churn:3", "eventType": REGISTERED, "data": DATA,
                        "topic": WORKSPACE}]).encode()
    ok = HookRequest("POST", {"X-Modelcd-Secret": AZURE_SECRET, "aeg-event-type": "Notification"}, {}, body)
    result = source.receive(ok, NOW)
    assert result == Accepted("e1", {"aeg-event-type": "Notification"})
    refused(source, HookRequest("POST", {"X-Modelcd-Secret": WRONG}, {}, body), 401, "X-Modelcd-Secret")
    refused(source, HookRequest("POST", {}, {}, body), 401, "?code=", "X-Modelcd-Secret")


def test_cloudevents_structured_single_object(source: Source) -> None:
    event = ce_v1.CloudEvent({"id": "ce-1", "type": REGISTERED, "source": WORKSPACE, "subject": "models/churn:3"},
                             {**DATA, "ModelVersion": 3})
    msg = ce_http.to_structured_event(event)
    assert msg.headers["content-type"].startswith("application/cloudevents+json")
    req = HookRequest("POST", msg.headers, {"code": AZURE_SECRET}, msg.body)
    result = source.receive(req, NOW)
    assert isinstance(result, Accepted) and result.delivery_id == "ce-1"
    assert source.normalise(req.body, result.kept_headers) == [EXPECTED]


def test_cloudevents_batch_array(source: Source) -> None:
    events = [ce_v1.CloudEvent({"id": f"ce-{i}", "type": t, "source": WORKSPACE, "subject": "models/churn:3"}, DATA)
              for i, t in enumerate([REGISTERED, "Microsoft.MachineLearningServices.ModelDeployed"])]
    body = b"[" + b",".join(ce_http.to_structured_event(e).body for e in events) + b"]"
    req = HookRequest("POST", {"Content-Type": "application/cloudevents-batch+json; charset=utf-8"},
                      {"code": AZURE_SECRET}, body)
    result = source.receive(req, NOW)
    assert isinstance(result, Accepted) and result.delivery_id == batch_id(["ce-0", "ce-1"])
    registered, ignored = source.normalise(req.body, result.kept_headers)
    assert registered == EXPECTED and isinstance(ignored, Ignored)


def test_cloudevents_binary_mode(source: Source) -> None:
    event = ce_v1.CloudEvent({"id": "ce-bin", "type": REGISTERED, "source": WORKSPACE, "subject": "models/churn:3",
                              "datacontenttype": "application/json"}, DATA)
    msg = ce_http.to_binary_event(event)
    req = HookRequest("POST", msg.headers, {"code": AZURE_SECRET}, msg.body)
    result = source.receive(req, NOW)
    assert isinstance(result, Accepted) and result.delivery_id == "ce-bin"
    assert {"ce-id", "ce-type", "ce-source", "ce-subject"} <= set(result.kept_headers)
    assert source.normalise(req.body, result.kept_headers) == [EXPECTED]


def test_options_abuse_protection_handshake(source: Source) -> None:
    req = HookRequest("OPTIONS", {"WebHook-Request-Origin": "eventgrid.azure.net", "WebHook-Request-Rate": "120"},
                      {"code": AZURE_SECRET}, b"")
    assert source.receive(req, NOW) == Respond(200, b"", {"WebHook-Allowed-Origin": "eventgrid.azure.net",
                                                          "WebHook-Allowed-Rate": "*", "Allow": "POST"})
    odd = HookRequest("OPTIONS", {"WebHook-Request-Origin": "x\r\nSet-Cookie: a"}, {}, b"")
    result = source.receive(odd, NOW)
    assert isinstance(result, Respond) and result.headers["WebHook-Allowed-Origin"] == "*"


def test_options_refused_with_a_wrong_secret_or_unconfigured(source: Source, tmp_path: Path) -> None:
    refused(source, HookRequest("OPTIONS", {}, {"code": WRONG}, b""), 401, "does not match")
    unset = get_source("azureml", make_settings(tmp_path, hooks_azureml_secret=None))
    refused(unset, HookRequest("OPTIONS", {}, {}, b""), 401, "MODELCD_HOOKS_AZUREML_SECRET")


def test_other_methods(source: Source) -> None:
    result = source.receive(HookRequest("GET", {}, {}, b""), NOW)
    assert isinstance(result, Respond) and result.status == 405 and result.headers["Allow"] == "POST, OPTIONS"


@pytest.mark.parametrize(("body", "needle"), [
    (b"[]", "empty array"),
    (b'[{"subject": "models/churn:3", "eventType": "x", "data": {}}]', "[0].id: missing"),
    (b'[{"id": "a", "eventType": "Microsoft.MachineLearningServices.ModelRegistered", "data": {"ModelName": "c"}}]',
     "ModelVersion: missing"),
    (b'[{"id": "a", "data": {}}]', "no eventType"),
    (b'[{"id": "a", "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent", "data": {}}]',
     "validationCode: missing"),
    (b'["x"]', "[0]: must be a JSON object"),
])
def test_malformed_events_are_400(source: Source, body: bytes, needle: str) -> None:
    refused(source, HookRequest("POST", {}, {"code": AZURE_SECRET}, body), 400, needle)
