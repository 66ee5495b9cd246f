"""The console's dead letters: what was set aside, why, for which saga, and the two ways to settle
one (requeue, discard), each behind its own permission, with a reason, in the admin history.
Rows are filed by the consumers (sagas.dead_letters) and never edited here."""
from functools import partial

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from sagas import dead_letters
from sagas.admin import ReadOnlyAdmin
from sagas.broker import BrokerUnavailable
from sagas.dead_letter_models import DeadLetter
from sagas.models import Saga

BODY_PREVIEW_CHARS = 120
EXPLANATIONS = {
    "requeue": "Send the message back to saga.replies as the participant sent it (same message_id and correlation_id, "
               "without our dead-letter and tries headers). The consumer judges it afresh: if it is still poison it "
               "comes back here as a new dead letter.",
    "discard": "Keep the row for the record, marked discarded: nothing is sent. Settle the reply with the participant "
               "first if its saga waits for it.",
}


class ReasonForm(forms.Form):
    reason = forms.CharField(max_length=500, widget=forms.Textarea(attrs={"rows": 3, "cols": 70}),
                             help_text="Why. It goes into the admin history.")


def _body_text(row: DeadLetter) -> str:
    return bytes(row.body).decode("utf-8", "backslashreplace")


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdmin):
    list_display = ("letter", "dead_lettered_at", "status", "short_reason", "saga_link", "body_preview")
    list_filter = ("status",)
    search_fields = ("=saga_id", "=message_id", "=correlation_id")
    search_help_text = "Exact saga id, message_id or correlation_id."
    ordering = ("-dead_lettered_at", "-id")
    actions = None
    show_full_result_count = False
    fields = ("status", "reason", "saga_link", "message_id", "correlation_id", "dead_lettered_at", "filed_at",
              "body_text", "headers", "settled_by", "settled_at", "note")
    readonly_fields = fields

    @admin.display(description="dead letter", ordering="id")
    def letter(self, row):
        return f"#{row.pk}"

    @admin.display(description="reason")
    def short_reason(self, row):
        return row.reason if len(row.reason) <= 100 else row.reason[:97] + "..."

    @admin.display(description="saga")
    def saga_link(self, row):
        if row.saga_id is None:
            return None
        if not Saga.objects.filter(pk=row.saga_id).exists():
            return format_html("<code>{}</code> (pruned)", row.saga_id)
        return format_html('<a href="{}"><code>{}</code></a>', reverse("admin:sagas_saga_change", args=[row.saga_id]),
                           row.saga_id)

    @admin.display(description="body")
    def body_preview(self, row):
        text = _body_text(row)
        return text if len(text) <= BODY_PREVIEW_CHARS else text[:BODY_PREVIEW_CHARS - 3] + "..."

    @admin.display(description="body")
    def body_text(self, row):
        return format_html("<pre>{}</pre>", _body_text(row))

    def get_urls(self):
        return [
            *(path(f"<path:object_id>/{action}/", self.admin_site.admin_view(partial(self.settle_view, action=action)),
                   name=f"sagas_deadletter_{action}") for action in dead_letters.ACTIONS),
            *super().get_urls(),
        ]

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None and obj.status == DeadLetter.Status.OPEN:
            context["settle_actions"] = [
                (action, reverse(f"admin:sagas_deadletter_{action}", args=[obj.pk]))
                for action, (permission, _, _) in dead_letters.ACTIONS.items() if request.user.has_perm(permission)
            ]
        return super().render_change_form(request, context, add=add, change=change, form_url=form_url, obj=obj)

    def settle_view(self, request, object_id, action):
        row = self.get_object(request, unquote(object_id))
        if row is None:
            raise Http404("No such dead letter.")
        permission = dead_letters.ACTIONS[action][0]
        if not (self.has_view_permission(request, row) and request.user.has_perm(permission)):
            raise PermissionDenied
        page = reverse("admin:sagas_deadletter_change", args=[row.pk])
        form = ReasonForm(request.POST if request.method == "POST" else None)
        if form.is_bound and form.is_valid():
            try:
                settled = dead_letters.settle_by(user=request.user, action=action, dead_letter_id=row.pk,
                                                 note=form.cleaned_data["reason"])
            except dead_letters.NotOpen as error:
                messages.error(request, str(error))
            except BrokerUnavailable as error:
                messages.error(request, f"RabbitMQ did not take it, so nothing changed: {error}. Try again shortly.")
            else:
                messages.success(request, f"Dead letter #{settled.pk} {settled.status}.")
            return HttpResponseRedirect(page)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts, "title": f"{action.capitalize()} dead letter #{row.pk}", "row": row,
            "body": _body_text(row), "action": action, "explanation": EXPLANATIONS[action], "form": form, "page": page,
        }
        return TemplateResponse(request, "admin/sagas/deadletter/settle.html", context)
