"""The stack's compose project against the settings that name its services, models and variables: part of
validating a host (tasks/validation.py), before anything on any host changes. Reading the project needs
`docker compose` on the control node; the checks themselves (`project_setting_problems`) are pure.
"""

from __future__ import annotations

from ..config import HostConfig, Settings, setting_problem
from ..host.declarations import gpu_asks
from .compose_project import BASE_IMAGE_VARIABLE, ComposeProject, StackError


def project_problems(host_name: str, config: HostConfig) -> list[str]:
    """The project `stack` names, read by docker compose, against CONFIG; one problem if it cannot be read."""
    try:
        project = ComposeProject.load(config.stack, tuple(config.compose_files))
    except StackError as error:
        return [setting_problem(host_name, "stack", config.stack,
                                f"a compose project docker compose can read: {error}")]
    return project_setting_problems(host_name, config, project)


def project_setting_problems(host_name: str, config: HostConfig, project: ComposeProject) -> list[str]:
    return (_service_problems(host_name, config, project) + _model_problems(host_name, config)
            + _variable_problems(host_name, config, project))


def _service_problems(host_name: str, config: HostConfig, project: ComposeProject) -> list[str]:
    """ml_services and service_gpus name services of the project; a service's GPUs come from one source."""
    problems = []
    services = list(project.services)
    for setting in ("ml_services", "service_gpus"):
        for service in getattr(config, setting):
            if service not in services:
                value = getattr(config, setting)[service]
                problems.append(setting_problem(host_name, f"{setting}.{service}",
                                                value.dump() if isinstance(value, Settings) else value,
                                                f"a service of stack {config.stack!r}: {', '.join(services)}"))
    for service, request in config.service_gpus.items():  # one source for a service's GPUs, never two reservations
        asks = gpu_asks(project.services[service]) if service in services else []
        if asks:
            problems.append(setting_problem(host_name, f"service_gpus.{service}", request,
                                            f"no entry for {service}: its compose definition asks for GPUs itself "
                                            f"({asks[0]}); keep one of the two"))
    return problems


def _model_problems(host_name: str, config: HostConfig) -> list[str]:
    """Every model variable ml_services read has a service_models entry, naming a repo the deploy places."""
    problems = []
    readers: dict[str, list[str]] = {}
    for service, uses in config.ml_services.items():
        for variable in uses.models:
            readers.setdefault(variable, []).append(service)
    for variable, names in readers.items():
        if variable not in config.service_models:
            problems.append(setting_problem(host_name, "service_models", config.service_models,
                                            f"an entry for {variable} (ml_services: read by {', '.join(names)})"))
    repo_ids = sorted({model.repo_id for model in config.models})
    for variable, repo_id in config.service_models.items():
        if repo_id not in repo_ids:
            problems.append(setting_problem(host_name, f"service_models.{variable}", repo_id,
                                            "a repo_id from models (the stack must use a model the deploy places: "
                                            f"{', '.join(repo_ids) or 'none'})"))
    return problems


def _variable_problems(host_name: str, config: HostConfig, project: ComposeProject) -> list[str]:
    """Each variable an active service reads without a default has a value: the deploy's, stack_env,
    stack_secrets or the project's own `.env`."""
    given = {BASE_IMAGE_VARIABLE, *config.stack_env, *config.stack_secrets, *project.dotenv}
    unset: dict[str, list[str]] = {}
    for service in project.active(config.stack_profiles):
        for variable, has_default in project.reads(service).items():
            if not has_default and variable not in given:
                unset.setdefault(variable, []).append(service)
    return [setting_problem(host_name, "stack", config.stack,
                            f"a value for ${{{variable}}}, which {', '.join(names)} "
                            "read without a default: set it in stack_env or stack_secrets")
            for variable, names in unset.items()]
