"""The admin's live pages listen here: staff only, one group per saga plus one for the list."""
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from sagas.live import ALL_SAGAS_GROUP, saga_group


class SagaProgressSocket(AsyncJsonWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not user.is_staff:
            await self.close(code=4403)
            return
        saga_id = self.scope["url_route"]["kwargs"].get("saga_id")
        self.group = saga_group(str(saga_id)) if saga_id else ALL_SAGAS_GROUP
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def saga_progress(self, message):
        await self.send_json(message)
