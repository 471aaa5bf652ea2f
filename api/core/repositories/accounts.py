"""Organizations and their API keys."""

from __future__ import annotations

from api.core.models import ApiKey, Organization
from api.core.repositories.base import Repository


class OrganizationRepository(Repository[Organization]):
    model = Organization

    def get_by_name(self, name: str) -> Organization | None:
        return self.get_one_or_none(self.base_statement().where(Organization.name == name))


class ApiKeyRepository(Repository[ApiKey]):
    model = ApiKey

    def get_by_prefix(self, prefix: str) -> ApiKey | None:
        return self.get_one_or_none(self.base_statement().where(ApiKey.prefix == prefix))
