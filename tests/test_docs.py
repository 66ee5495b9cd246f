"""The documents that carry the interface: docs/asyncapi.yaml against the official AsyncAPI 3.0.0
schema and against what the code sends and accepts, the OpenAPI schema through drf-spectacular's
validator, docs/alerts.yml through promtool, and docs/contract.md against the shared contract.
Nothing here needs the broker, the database or Redis."""
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from referencing import Registry
from referencing.jsonschema import DRAFT7

from sagas import consumer, engine
from sagas.broker import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_LIMIT,
    DEAD_LETTER_POLICY,
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_REASON,
    EVENTS_EXCHANGE,
    PARTICIPANT_QUEUES,
    REPLIES_QUEUE,
)
from sagas.engine import ActionRefused, Command, Event, Limits
from sagas.flows import ORDER_FLOW
from sagas.replies import parse_reply
from sagas.vocabulary import TERMINAL, UNDONE_TWICE

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
# the official AsyncAPI 3.0.0 JSON Schema, from the npm package @asyncapi/specs 6.11.1 (tests/schemas/README.md)
OFFICIAL_SCHEMA = Path(__file__).parent / "schemas" / "asyncapi-3.0.0.json"
OFFICIAL_SCHEMA_SHA256 = "d4571a420e6ffb7fcc7066c95a6db1202f299a3c51daa103d0706bf30f95e626"
ASYNCAPI = yaml.safe_load((DOCS / "asyncapi.yaml").read_text())
# the metric names the service exports (docs/contract.md Part B, "Metrics")
METRICS = {
    "saga_started_total", "saga_finished_total", "saga_transitions_total", "saga_replies_total", "saga_resends_total",
    "saga_timeouts_total", "saga_rebuilds_total", "saga_broker_reconnects_total", "saga_outbox_unsent",
    "saga_outbox_oldest_unsent_age_seconds", "saga_stuck", "saga_dead_letter_queue_messages",
    "saga_consumer_last_loop_timestamp_seconds", "saga_reply_to_commit_seconds", "saga_post_to_terminal_seconds",
}
RUNBOOK_ANCHORS = {"stuck-sagas", "dead-letters", "outbox-backlog", "consumer-down"}


# --- AsyncAPI against the official schema

def official_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(OFFICIAL_SCHEMA.read_text()))


def test_the_vendored_schema_is_the_official_file_unchanged():
    assert hashlib.sha256(OFFICIAL_SCHEMA.read_bytes()).hexdigest() == OFFICIAL_SCHEMA_SHA256


def test_asyncapi_document_validates_against_the_official_3_0_0_schema():
    errors = [f"{list(error.absolute_path)}: {error.message[:300]}" for error in official_validator().iter_errors(ASYNCAPI)]
    assert errors == []


@pytest.mark.parametrize("break_it", [
    lambda doc: doc["operations"]["receiveReply"].update(action="subscribe"),  # AsyncAPI 2's verbs
    lambda doc: doc["components"]["messages"]["Reply"].update(bindings={"amqp": {"deliveryMode": 2}}),
    lambda doc: doc["operations"]["sendOrderCancel"]["bindings"]["amqp"].update(deliveryMode=3),
    lambda doc: doc["channels"]["replies"]["bindings"]["amqp"].update(**{"is": "exchange"}),
], ids=["v2-action", "message-binding", "delivery-mode", "channel-kind"])
def test_the_official_schema_refuses_a_broken_document(break_it):
    broken = copy.deepcopy(ASYNCAPI)
    break_it(broken)
    assert list(official_validator().iter_errors(broken))


# --- AsyncAPI against the code

def routes(exchange: str) -> dict[str, str]:
    """routing key -> JSON pointer of the documented payload, for the channels on `exchange`."""
    found = {}
    for channel in ASYNCAPI["channels"].values():
        amqp = channel["bindings"]["amqp"]
        if amqp["is"] == "routingKey" and amqp["exchange"]["name"] == exchange:
            (message,) = channel["messages"].values()
            found[channel["address"]] = message["$ref"].removeprefix("#") + "/payload"
    return found


def queues() -> dict[str, dict]:
    return {channel["address"]: channel for channel in ASYNCAPI["channels"].values()
            if channel["bindings"]["amqp"]["is"] == "queue"}


BASE = "https://orchestrator.invalid/asyncapi.yaml"
REGISTRY = Registry().with_resource(BASE, DRAFT7.create_resource(ASYNCAPI))


def documented(pointer: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator({"$ref": f"{BASE}#{pointer}"}, registry=REGISTRY,
                                      format_checker=jsonschema.FormatChecker())


def test_asyncapi_names_the_topology_the_code_declares():
    commands = {command for step in ORDER_FLOW.steps for command in (step.command, step.compensation)}
    assert set(routes(COMMANDS_EXCHANGE)) == commands
    events = {f"saga.{status}" for status in TERMINAL} | {UNDONE_TWICE}
    assert set(routes(EVENTS_EXCHANGE)) == events
    declared = {*PARTICIPANT_QUEUES, REPLIES_QUEUE, DEAD_LETTER_QUEUE}
    assert set(queues()) == declared
    for name, channel in queues().items():
        assert channel["bindings"]["amqp"]["queue"] == {"name": name, "durable": True, "exclusive": False, "autoDelete": False}
    for queue_name, binding in PARTICIPANT_QUEUES.items():
        assert f"`{binding}`" in queues()[queue_name]["description"]
    assert f"{DEAD_LETTER_LIMIT}" in queues()[DEAD_LETTER_QUEUE]["description"].replace(",", "")
    assert DEAD_LETTER_POLICY in queues()[DEAD_LETTER_QUEUE]["description"]


def test_asyncapi_documents_the_headers_the_consumer_writes():
    messages = ASYNCAPI["components"]["messages"]
    assert consumer.TRIES_HEADER in messages["Reply"]["headers"]["properties"]
    assert consumer.TRIES_HEADER in messages["DeadLetter"]["headers"]["properties"]
    assert consumer.TRIES_SIGNATURE_HEADER in messages["Reply"]["headers"]["properties"]
    assert messages["DeadLetter"]["headers"]["required"] == [DEAD_LETTER_REASON]
    assert "user_id" in messages["Reply"]["x-amqp-properties"]["properties"]


LIMITS = Limits(step_timeout=10.0, step_max_attempts=2, compensation_max_attempts=2)
text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)
orders = st.fixed_dictionaries({
    "user_id": st.one_of(text, st.integers(0, 10**12).map(str)),
    "items": st.lists(st.fixed_dictionaries({"product_id": st.text(min_size=1, max_size=64),
                                             "quantity": st.integers(1, 10000)}),
                      min_size=1, max_size=5, unique_by=lambda item: item["product_id"]),
    "currency": st.from_regex(r"\A[A-Z]{3}\Z"),
    "payment_method": st.one_of(st.none(), st.text(max_size=128)),
})
# what a participant may put in data.total: a decimal string (the contract) or a JSON number
totals = st.one_of(st.decimals(0, "999999999999.99", places=2).map(str), st.integers(0, 10**6),
                   st.floats(0, 10**6, allow_nan=False))
# what a database column can hold: no NUL, no lone surrogate (the parser refuses the rest, documented)
storable = st.characters(codec="utf-8", exclude_characters="\x00")
order_ids = st.one_of(st.text(storable, min_size=1, max_size=128), st.integers(0, 10**12))
# success more often than the rest, so that walks reach the later steps
ACTIONS = ["success"] * 4 + ["failure", "timeout", "late_success", "compensate", "retry", "resume", "mark"]
ORDER = {"user_id": "u1", "items": [{"product_id": "sku-1", "quantity": 2}], "currency": "EUR", "payment_method": None}
S, F, T = ("success", 0), ("failure", 0), ("timeout", 0)


@settings(max_examples=300, deadline=None)
@given(order=orders, moves=st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 100)), max_size=25),
       total=totals, order_id=order_ids)
@example(order=ORDER, moves=[S, S, S], total="19.98", order_id="o-1")  # saga.completed
@example(order=ORDER, moves=[S, S, S, ("compensate", 0)], total="19.98", order_id=77)  # order.cancel with order_id
@example(order=ORDER, moves=[S, F, F, T, F], total=5, order_id="o-1")  # saga.failed
# stock.restore sent, then marked by hand, then its success arrives: saga.undone_twice
@example(order=ORDER, moves=[S, F, ("mark", 0), ("late_success", 2)], total="0.10", order_id="o-1")
def test_every_message_the_engine_sends_has_its_documented_shape(order, moves, total, order_id):
    """Orders the API accepts, replies as participants may send them (read by the consumer's own
    parser), timeouts and staff actions in any order: every command and event sent is documented."""
    saga_id, now = str(uuid.uuid4()), 0.0
    decision = engine.start(ORDER_FLOW, saga_id=saga_id, facts=order, limits=LIMITS, now=now)
    sent, commands, events = list(decision.messages), routes(COMMANDS_EXCHANGE), routes(EVENTS_EXCHANGE)
    state = decision.state
    for action, pick in moves:
        now += 1.0
        try:
            decision = _move(state, action, pick, now, total, order_id, sent)
        except ActionRefused:
            continue
        state = decision.state
        sent.extend(decision.messages)
    for message in sent:
        event(getattr(message, "command", None) or message.routing_key)
        if isinstance(message, Command):
            documented(commands[message.command]).validate(message.body())
        else:
            assert isinstance(message, Event)
            documented(events[message.routing_key]).validate(message.body)


def _move(state, action, pick, now, total, order_id, sent):
    awaited = state.awaiting
    if action in ("success", "failure") and awaited is not None:
        return engine.on_reply(ORDER_FLOW, state, _reply(state.saga_id, awaited.command, awaited.attempt, action, total,
                order_id),
                               limits=LIMITS, now=now)
    if action == "timeout" and awaited is not None:
        return engine.on_timeout(ORDER_FLOW, state, limits=LIMITS, now=awaited.deadline)
    if action == "late_success":
        commands = [m for m in sent if isinstance(m, Command)]
        earlier = commands[pick % len(commands)]
        return engine.on_reply(ORDER_FLOW, state, _reply(state.saga_id, earlier.command, earlier.attempt, "success", total,
                order_id),
                               limits=LIMITS, now=now)
    if action == "compensate":
        return engine.compensate(ORDER_FLOW, state, reason="customer asked", limits=LIMITS, now=now)
    if action == "retry":
        return engine.retry_now(ORDER_FLOW, state, limits=LIMITS, now=now)
    if action == "resume":
        return engine.resume_compensation(ORDER_FLOW, state, limits=LIMITS, now=now)
    if action == "mark":
        return engine.mark_compensated(ORDER_FLOW, state, step_name=ORDER_FLOW.steps[pick % len(ORDER_FLOW.steps)].name,
                limits=LIMITS, now=now)
    return engine.ignored(state, "nothing to do")


def _reply(saga_id, command, attempt, status, total, order_id):
    data = {"stock.reduce": {"total": total}, "order.create": {"order_id": order_id}}.get(command, {})
    body = {"saga_id": saga_id, "command": command, "attempt": attempt, "status": status,
            "reason": None if status == "success" else "declined", "data": data}
    _, reply = parse_reply(json.dumps(body).encode())
    return reply


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=6)
COMMAND_NAMES = [command for step in ORDER_FLOW.steps for command in (step.command, step.compensation)]
contract_replies = st.fixed_dictionaries({
    "saga_id": st.uuids().map(str), "command": st.sampled_from(COMMAND_NAMES), "attempt": st.integers(1, 10**6),
    "status": st.sampled_from(["success", "failure"]), "reason": st.one_of(st.none(), st.text(storable, max_size=30)),
}).flatmap(lambda reply: st.fixed_dictionaries({
    **{key: st.just(value) for key, value in reply.items()},
    "data": st.just({"total": "19.98"}) if reply["command"] == "stock.reduce" and reply["status"] == "success"
    else st.fixed_dictionaries({"order_id": order_ids}) if reply["command"] == "order.create" and reply["status"] == "success"
    else st.one_of(st.none(), st.just({})),
}))
# a contract reply with one field replaced by anything, or one left out
bent_replies = st.tuples(contract_replies, st.sampled_from(["saga_id", "command", "attempt", "status", "reason", "data"]),
                         st.one_of(st.just(...), json_values)).map(
    lambda bent: {key: value for key, value in {**bent[0], bent[1]: bent[2]}.items() if value is not ...})


@settings(max_examples=300, deadline=None)
@given(reply=contract_replies)
def test_every_contract_reply_is_documented_and_accepted(reply):
    documented("/components/messages/Reply/payload").validate(reply)
    parse_reply(json.dumps(reply).encode())


@settings(max_examples=1000, deadline=None)
@given(reply=bent_replies)
def test_a_reply_the_consumer_accepts_is_a_documented_reply(reply):
    try:
        parse_reply(json.dumps(reply).encode())
    except Exception:  # refused (that it is refused as PoisonMessage only is tests/test_replies*.py's to prove)
        return
    documented("/components/messages/Reply/payload").validate(reply)


# --- OpenAPI

@pytest.fixture(scope="module")
def openapi(tmp_path_factory) -> dict:
    target = tmp_path_factory.mktemp("openapi") / "openapi.yaml"
    result = subprocess.run(
        [sys.executable, "manage.py", "spectacular", "--validate", "--fail-on-warn", "--file", str(target)],
        cwd=REPO, env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return yaml.safe_load(target.read_text())


def test_openapi_schema_validates_without_a_warning(openapi):
    assert openapi["openapi"].startswith("3.")
    assert {"/orders/create_order", "/sagas/{id}", "/"} <= set(openapi["paths"])


@pytest.mark.parametrize(("path", "method", "codes"), [
    ("/orders/create_order", "post", {400, 401, 405, 413, 415, 422, 429, 503}),
    ("/sagas/{id}", "get", {401, 404, 405, 429, 503}),
])
def test_openapi_documents_each_error_body_as_json(openapi, path, method, codes):
    responses = openapi["paths"][path][method]["responses"]
    assert codes <= {int(code) for code in responses}
    for code in codes:
        assert "application/json" in responses[str(code)]["content"], (path, code)
        assert responses[str(code)]["description"]


def test_openapi_links_inside_the_repository_only(openapi):
    description = openapi["info"]["description"]
    assert "docs/contract.md" in description
    assert "../" not in description and "://" not in description


# --- docs/contract.md

CONTRACT = (DOCS / "contract.md").read_text()


def test_contract_links_resolve_inside_the_repository():
    links = re.findall(r"\]\(([^)]+)\)", CONTRACT)
    assert links
    for link in links:
        target = link.split("#")[0]
        assert "://" not in link and target, link
        assert (DOCS / target).resolve().is_relative_to(REPO) and (DOCS / target).exists(), link


def test_part_a_is_the_shared_contract_word_for_word():
    shared = REPO.parent / "shared" / "contract.md"
    if not shared.exists():
        pytest.skip(f"no {shared} beside this checkout")
    _title, body = shared.read_text().split("\n", 1)
    part_a = CONTRACT.split("# Part A. The binding contract\n", 1)[1].split("\n---\n\n# Part B.", 1)[0]
    assert part_a.strip() == body.strip()


def test_part_b_lists_every_metric_and_each_alert():
    part_b = CONTRACT.split("# Part B.", 1)[1]
    for metric in METRICS:
        assert f"`{metric}" in part_b, metric
    for rule in alert_rules():
        assert rule["alert"] in part_b


# --- docs/alerts.yml

def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((DOCS / "alerts.yml").read_text())["groups"] for rule in group["rules"]]


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: tools/test_setup.sh installs it (Debian's prometheus package)"
    return path


def test_alert_rules_pass_promtool_check():
    result = subprocess.run([promtool(), "check", "rules", "alerts.yml"], cwd=DOCS, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alert_unit_tests_pass_promtool():
    result = subprocess.run([promtool(), "test", "rules", "alerts.test.yml"], cwd=DOCS, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_alert_fires_in_a_unit_test_and_stays_silent_in_another():
    cases = [case for test in yaml.safe_load((DOCS / "alerts.test.yml").read_text())["tests"] for case in test["alert_rule_test"]]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} never shown firing"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} never shown silent"


def test_each_alert_says_what_to_do_and_where_the_runbook_is():
    names = {rule["alert"] for rule in alert_rules()}
    assert {"SagasFailed", "SagasOverdue", "OutboxBacklogAging", "DeadLettersArriving", "ConsumerDown"} <= names
    operations = DOCS / "operations.md"
    for rule in alert_rules():
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"]
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "docs/operations.md" and anchor in RUNBOOK_ANCHORS, rule["alert"]
        if operations.exists():  # written alongside; once there, a heading must make the anchor
            assert anchor in _heading_anchors(operations.read_text()), anchor
        used = set(re.findall(r"\b(saga_[a-z_]+)", rule["expr"]))
        assert used <= METRICS, used - METRICS


def _heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes of a page's headings."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", markdown, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_the_architecture_names_every_module_of_the_tree():
    """docs/architecture.md is the map of the code: a module it does not name is a module nobody
    finds, and one it names that is gone misleads."""
    text = (DOCS / "architecture.md").read_text()
    root = DOCS.parent
    modules = [path for package in ("sagas", "demo", "lab", "orchestration_site") for path in (root / package).rglob("*.py")
               if path.name != "__init__.py" and "migrations" not in path.parts]
    named = set(re.findall(r"[a-z_]+\.py", text))
    missing = sorted(str(path.relative_to(root)) for path in modules
                     if path.name not in named and path.parent.name not in ("commands", "peers", "faults"))
    assert not missing, f"not in docs/architecture.md: {missing}"
    gone = sorted(name for name in named if not any(path.name == name for path in modules))
    assert not gone, f"named in docs/architecture.md but not in the tree: {gone}"
