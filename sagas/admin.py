"""The support console: find a customer's order saga, see where it is, and undo it.

The list and the saga page are read-only views of the record (the database) that stay fast at
100,000 sagas; every change goes through the staff actions in sagas.admin_actions.
"""
from functools import cached_property, partial
from urllib.parse import urlencode

from django.contrib import admin
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import PAGE_VAR, ChangeList
from django.core.paginator import Paginator
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.timesince import timesince

from sagas import admin_actions, engine, selectors
from sagas.admin_filters import AgeFilter, CustomerFilter, StepFilter, StuckFilter
from sagas.failure_reasons import explain_failure
from sagas.flows import participant_of
from sagas.models import Saga

STATUS_FILTER = "status__exact"  # the parameter of the list filter on the status field


class CountingPaginator(Paginator):
    """Counts the list with the GROUP BY behind the counts box, instead of a COUNT(*) of its own."""

    @cached_property
    def breakdown(self) -> dict[tuple[str, str | None], int]:
        return selectors.counts_by_status_and_step(self.object_list)

    @cached_property
    def count(self) -> int:
        return sum(self.breakdown.values())


class SagaChangeList(ChangeList):
    def get_queryset(self, request, exclude_parameters=None):
        return super().get_queryset(request, exclude_parameters).only(*selectors.LIST_COLUMNS)

    def _count(self, position: int, value) -> int:
        return sum(n for key, n in self.paginator.breakdown.items() if key[position] == value)

    @cached_property
    def status_counts(self) -> list[tuple[str, int, str]]:
        """(status, number of sagas in the list, link to the list filtered by it)."""
        return [(status, self._count(0, status), self.get_query_string({STATUS_FILTER: status}, [PAGE_VAR]))
                for status in Saga.Status.values]

    @cached_property
    def step_counts(self) -> list[tuple[str, int, str | None]]:
        rows = [(step, self._count(1, step), self.get_query_string({StepFilter.parameter_name: step}, [PAGE_VAR]))
                for step in selectors.STEP_NAMES]
        return [*rows, ("none (finished)", self._count(1, None), None)]


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows that only the service functions change: the console reads them, and changes them
    through its permissioned, audited actions alone (sagas by their own services, dead letters by
    requeue and discard)."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Saga)
class SagaAdmin(ReadOnlyAdmin):
    paginator = CountingPaginator
    list_display = ("saga", "status_badge", "current_step", "customer", "amount", "age", "last_change")
    list_display_links = ("saga",)
    list_filter = ("status", StepFilter, AgeFilter, StuckFilter, CustomerFilter)
    # The search box needs search_fields to appear; get_search_results does the exact lookups.
    search_fields = ("=id", "=user_id", "=order_id")
    search_help_text = "Exact saga id, customer (user id) or order id."
    sortable_by = ("age", "last_change")
    ordering = ("-created_at",)
    actions = None
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # facet counts are a query per filter choice; the counts box has them
    empty_value_display = "—"
    fieldsets = (
        ("Order", {"fields": ("id", "status", "current_step", "failure_reason", "user_id", "order_id", "total",
                              "currency", "items", "payment_method")}),
        ("Bookkeeping", {"fields": ("version", "deadline", "idempotency_key", "created_at", "updated_at"),
                         "classes": ("collapse",)}),
        ("Engine state", {"fields": ("state",), "classes": ("collapse",)}),
    )
    readonly_fields = [field for _, options in fieldsets for field in options["fields"]]

    def get_changelist(self, request, **kwargs):
        return SagaChangeList

    def get_search_results(self, request, queryset, search_term):
        condition = selectors.search_condition(search_term)
        return (queryset if condition is None else queryset.filter(condition)), False

    @admin.display(description="saga")
    def saga(self, saga):
        return format_html('<code title="{}">{}</code>', saga.pk, str(saga.pk)[:8])

    @admin.display(description="status")
    def status_badge(self, saga):
        return format_html('<span class="saga-status saga-status-{}">{}</span>', saga.status, saga.status)

    @admin.display(description="customer")
    def customer(self, saga):
        return format_html('<a href="?{}">{}</a>', urlencode({CustomerFilter.parameter_name: saga.user_id}), saga.user_id)

    @admin.display(description="total")
    def amount(self, saga):
        return f"{saga.total} {saga.currency}" if saga.total is not None else None

    @admin.display(description="age", ordering="created_at")
    def age(self, saga):
        return format_html('<span title="{}">{}</span>', saga.created_at.isoformat(), _since(saga.created_at))

    @admin.display(description="last change", ordering="updated_at")
    def last_change(self, saga):
        return format_html('<span title="{}">{} ago</span>', saga.updated_at.isoformat(), _since(saga.updated_at))

    def get_urls(self):
        actions = [
            path(f"<path:object_id>/{action.slug}/",
                 self.admin_site.admin_view(partial(self.staff_action_view, action=action)), name=action.url_name)
            for action in admin_actions.ACTIONS
        ]
        return [*actions, *super().get_urls()]

    def staff_action_view(self, request, object_id, action):
        return admin_actions.run_action(self, request, unquote(object_id), action)

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            state = obj.engine_state()
            context.update(
                saga=obj,
                diagram=selectors.step_diagram(state),
                compensating=obj.status in (Saga.Status.COMPENSATING, Saga.Status.COMPENSATED, Saga.Status.FAILED),
                **_timeline_context(request, obj),
                failure_sentence=explain_failure(obj.failure_reason),
                undone_twice=_undone_twice(state),
                same_order=selectors.sagas_with_order(obj),
                customer_sagas=f"{reverse('admin:sagas_saga_changelist')}?"
                               f"{urlencode({CustomerFilter.parameter_name: obj.user_id})}",
                staff_actions=[(action, reverse(f"admin:{action.url_name}", args=[obj.pk]), action.refusal(state))
                               for action in admin_actions.permitted_actions(request.user)],
            )
        return super().render_change_form(request, context, add=add, change=change, form_url=form_url, obj=obj)


TIMELINE_PAGE = "timeline_page"  # the saga page's query parameter; page 1 (the newest entries) by default


def _timeline_context(request, saga: Saga) -> dict:
    try:
        wanted = int(request.GET.get(TIMELINE_PAGE, 1))
    except ValueError:
        wanted = 1
    page = selectors.saga_timeline(saga, page=wanted)

    def link(number: int) -> str:
        query = request.GET.copy()
        query[TIMELINE_PAGE] = number
        return f"?{query.urlencode()}"

    return {
        "timeline": page.entries,
        "timeline_page": page,
        "timeline_newer": link(page.number - 1) if page.number > 1 else None,
        "timeline_older": link(page.number + 1) if page.number < page.pages else None,
        "timeline_oldest": link(page.pages) if page.number < page.pages else None,
        "timeline_newest": link(1) if page.number > 1 else None,
    }


def _undone_twice(state) -> list[dict]:
    """Steps that staff marked undone by hand and that a participant undid as well."""
    commands = {step.name: step.compensation for step in engine.flow_of(state).steps}
    return [{"name": step.name, "command": commands[step.name], "participant": participant_of(commands[step.name])}
            for step in state.steps if step.undone_twice]


def _since(moment) -> str:
    return timesince(moment, timezone.now(), depth=1)
