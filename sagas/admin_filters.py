"""The saga list's filters. Each one is a condition on an indexed column, so it stays fast at
100,000 sagas, and none of them asks the database for its choices."""
from datetime import timedelta

from django.contrib import admin
from django.utils import timezone

from sagas import selectors


class StepFilter(admin.SimpleListFilter):
    title = "current step"
    parameter_name = "step"

    def lookups(self, request, model_admin):
        # from the flow, not SELECT DISTINCT over every saga
        return [(name, name) for name in selectors.STEP_NAMES]

    def queryset(self, request, queryset):
        return queryset.filter(current_step=self.value()) if self.value() else queryset


class AgeFilter(admin.SimpleListFilter):
    title = "age"
    parameter_name = "age"

    def lookups(self, request, model_admin):
        return [("hour", "Last hour"), ("today", "Today"), ("day_plus", "Older than a day")]

    def queryset(self, request, queryset):
        now = timezone.now()
        if self.value() == "hour":
            return queryset.filter(created_at__gte=now - timedelta(hours=1))
        if self.value() == "today":
            midnight = timezone.localtime(now).replace(hour=0, minute=0, second=0, microsecond=0)
            return queryset.filter(created_at__gte=midnight)
        if self.value() == "day_plus":
            return queryset.filter(created_at__lt=now - timedelta(days=1))
        return queryset


class StuckFilter(admin.SimpleListFilter):
    title = "needs attention"
    parameter_name = "stuck"

    def lookups(self, request, model_admin):
        return [("yes", "Stuck: reply overdue or failed")]

    def queryset(self, request, queryset):
        return queryset.filter(selectors.stuck_condition(timezone.now())) if self.value() == "yes" else queryset


class CustomerFilter(admin.SimpleListFilter):
    """The list of one customer's sagas, linked from a saga page; shown only while it is in use."""

    title = "customer"
    parameter_name = "user_id"

    def lookups(self, request, model_admin):
        return [(self.value(), self.value())] if self.value() else []

    def queryset(self, request, queryset):
        return queryset.filter(user_id=self.value()) if self.value() else queryset
