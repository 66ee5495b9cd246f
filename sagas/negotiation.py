"""Content negotiation for an API that writes JSON only (a module of its own: DRF imports it
while its views load, so it must not import them)."""
from rest_framework import exceptions
from rest_framework.negotiation import DefaultContentNegotiation


class JSONWhateverTheAccept(DefaultContentNegotiation):
    """An Accept header that names nothing this API writes gets JSON anyway, not a 406."""

    def select_renderer(self, request, renderers, format_suffix=None):
        try:
            return super().select_renderer(request, renderers, format_suffix)
        except exceptions.NotAcceptable:
            return renderers[0], renderers[0].media_type
