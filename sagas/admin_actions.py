"""What support staff may do to one saga from its admin page.

Each action has its own permission, asks for a reason on a page of its own, goes through the
sagas.services function for it (never an edit of the rows: the service compares-and-sets, so it
is safe while the consumer moves the saga), and is written to the admin history with who, why
and what was sent. A state that does not allow the action comes back as the engine's sentence.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from datetime import timezone as dt_timezone

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse

from sagas import engine, services, vocabulary
from sagas.engine import ActionRefused, Decision, SagaState


class ReasonForm(forms.Form):
    reason = forms.CharField(
        max_length=500, widget=forms.Textarea(attrs={"rows": 3, "cols": 70}),
        help_text="Why you are doing this. It goes on the saga's timeline and into the admin history.",
    )

    def __init__(self, *args, state: SagaState, **kwargs):
        self.state = state
        super().__init__(*args, **kwargs)

    def service_arguments(self) -> dict:
        return {"reason": self.cleaned_data["reason"]}


class CompensateForm(ReasonForm):
    # the state version whose plan the person confirmed; a newer one means a new plan to confirm
    version = forms.IntegerField(widget=forms.HiddenInput)

    def __init__(self, *args, state: SagaState, **kwargs):
        kwargs["initial"] = {**kwargs.get("initial", {}), "version": state.version}
        super().__init__(*args, state=state, **kwargs)

    def plan_is_stale(self) -> bool:
        return self.cleaned_data["version"] != self.state.version


class MarkStepForm(ReasonForm):
    step_name = forms.ChoiceField(label="Step", widget=forms.RadioSelect,
                                  help_text="The step whose effect was undone outside the system.")

    def __init__(self, *args, state: SagaState, **kwargs):
        super().__init__(*args, state=state, **kwargs)
        self.fields["step_name"].choices = [
            (step.name, f"{step.name} (now {step.status}, {step.compensation_attempts} "
                        f"undo attempt{'' if step.compensation_attempts == 1 else 's'})")
            for step in state.steps
        ]

    def service_arguments(self) -> dict:
        return {**super().service_arguments(), "step_name": self.cleaned_data["step_name"]}


@dataclass(frozen=True)
class StaffAction:
    slug: vocabulary.StaffAction
    label: str
    permission: str  # a codename from Saga.Meta.permissions
    form: type[ReasonForm]
    service: Callable[..., Decision]
    explanation: str

    @property
    def url_name(self) -> str:
        return f"sagas_saga_{self.slug.replace('-', '_')}"

    def refusal(self, state: SagaState) -> str | None:
        """The engine's sentence if the saga's state does not allow this action now, else None."""
        return engine.refusal(state, self.slug)


ACTIONS = (
    StaffAction(vocabulary.StaffAction.COMPENSATE, "Compensate", "compensate_saga", CompensateForm, services.compensate_saga,
                "Undo every step that took effect, latest first. Works on running, completed and failed sagas; "
                "a command still in flight is undone too, in case it took effect."),
    StaffAction(vocabulary.StaffAction.RETRY, "Retry now", "retry_saga", ReasonForm, services.retry_saga_step,
                "Send the command the saga is waiting for again now, instead of at its deadline. If its attempts "
                "are used up, this grants one more; it never gives up on the step or undoes the saga."),
    StaffAction(vocabulary.StaffAction.RESUME, "Resume compensation", "resume_saga", ReasonForm,
                services.resume_saga_compensation,
                "Start undoing again a failed saga whose compensation gave up, with a fresh set of attempts."),
    StaffAction(vocabulary.StaffAction.MARK_COMPENSATED, "Mark a step compensated", "mark_step_compensated", MarkStepForm,
                services.mark_step_compensated,
                "Record that a step was undone by hand (e.g. a refund made in the payment provider). "
                "The saga then undoes what is left, or ends compensated when nothing else is owed. If a "
                "compensation already sent for the step succeeds later, the saga flags it as undone twice."),
)


def permitted_actions(user) -> list[StaffAction]:
    return [action for action in ACTIONS if user.has_perm(f"sagas.{action.permission}")]


def describe_payload(payload: dict) -> str:
    """A compensation's payload the way a person checks it: what goes back, how much, which order."""
    parts = []
    if payload.get("items"):
        parts.append(", ".join(f"{item['quantity']} × {item['product_id']}" for item in payload["items"]))
    if payload.get("amount") is not None:
        parts.append(f"{payload['amount']} {payload.get('currency') or ''}".strip())
    if payload.get("order_id"):
        parts.append(f"order {payload['order_id']}")
    return "; ".join(parts)


def describe_sent(decision: Decision) -> str:
    sent = [
        f"{message.command} (attempt {message.attempt}) {json.dumps(message.payload, sort_keys=True)}"
        if isinstance(message, engine.Command) else f"event {message.routing_key}"
        for message in decision.messages
    ]
    return "; ".join(sent) or "nothing"


def run_action(model_admin, request, object_id: str, action: StaffAction):
    """The action's page: GET asks for the reason (and shows the plan); POST calls the service.
    An action the saga's state does not allow sends the person back with the engine's sentence."""
    saga = model_admin.get_object(request, object_id)
    if saga is None:
        raise Http404("No such saga.")
    if not (model_admin.has_view_permission(request, saga) and request.user.has_perm(f"sagas.{action.permission}")):
        raise PermissionDenied
    saga_page = reverse("admin:sagas_saga_change", args=[saga.pk])
    state = saga.engine_state()  # what the staff services decide on too
    refusal = action.refusal(state) if request.method != "POST" else None
    if refusal:
        messages.error(request, refusal)
        return HttpResponseRedirect(saga_page)
    form = action.form(request.POST if request.method == "POST" else None, state=state)
    if form.is_bound and form.is_valid():
        if isinstance(form, CompensateForm) and form.plan_is_stale():
            messages.warning(request, "The saga moved on while you read the plan. Check the plan below and confirm again.")
            form = action.form(initial={"reason": form.cleaned_data["reason"]}, state=state)
        else:
            return _perform(model_admin, request, saga, action, form, saga_page)
    context = {
        **model_admin.admin_site.each_context(request),
        "opts": model_admin.opts,
        "title": f"{action.label}: saga {saga.pk}",
        "saga": saga,
        "state": state,
        "action": action,
        "form": form,
        "outstanding": [
            (item, datetime.fromtimestamp(item.last_sent_at, tz=dt_timezone.utc) if item.last_sent_at else None)
            for item in engine.outstanding_compensations(engine.flow_of(state), state)
        ] if isinstance(form, MarkStepForm) else None,
        "plan": [(command, describe_payload(command.payload), json.dumps(command.payload, sort_keys=True))
                 for command in engine.compensation_plan(engine.flow_of(state), state)]
        if isinstance(form, CompensateForm) else None,
        "saga_page": saga_page,
    }
    return TemplateResponse(request, "admin/sagas/saga/staff_action.html", context)


def _perform(model_admin, request, saga, action: StaffAction, form: ReasonForm, saga_page: str):
    actor = request.user.get_username()
    arguments = form.service_arguments()
    try:
        decision = action.service(saga_id=str(saga.pk), actor=actor, **arguments)
    except ActionRefused as refusal:
        messages.error(request, str(refusal))
        return HttpResponseRedirect(saga_page)
    except services.ConcurrentChange:
        messages.error(request, "The saga kept changing while we tried, so nothing was done. Try again.")
        return HttpResponseRedirect(saga_page)
    sent = describe_sent(decision)
    step = f" (step {arguments['step_name']})" if "step_name" in arguments else ""
    model_admin.log_change(request, saga, f"{action.label}{step} by {actor}. Reason: {arguments['reason']}. Sent: {sent}.")
    messages.success(request, f"{action.label}{step}: done; the saga is now {decision.state.status}. Sent: {sent}.")
    return HttpResponseRedirect(saga_page)
