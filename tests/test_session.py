"""Both language-model backends implement the protocols the engine works through (`engine/session.py`)."""

from __future__ import annotations

import inspect

import openvino as ov
import pytest

from edge_agent.engine import session as protocols
from edge_agent.engine.language import StatefulLanguageModel, StatefulSession
from edge_agent.engine.paged import PagedLanguageModel, PagedSession, load_language_model
from tests.support.language import frame_inputs

BACKENDS = [
    (protocols.LanguageSession, StatefulSession),
    (protocols.LanguageSession, PagedSession),
    (protocols.LanguageModel, StatefulLanguageModel),
    (protocols.LanguageModel, PagedLanguageModel),
]


def protocol_methods(protocol: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(protocol).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }


def parameters(signature: inspect.Signature) -> list[tuple[str, inspect._ParameterKind, object]]:
    """What a caller relies on: each parameter's name, kind and default (annotations may name either side)."""
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


@pytest.mark.parametrize("protocol, backend", BACKENDS, ids=lambda kind: kind.__name__)
def test_each_backend_has_every_method_of_its_protocol_with_the_same_parameters(protocol, backend):
    methods = protocol_methods(protocol)
    assert methods, f"{protocol.__name__} declares no methods"
    for name, expected in methods.items():
        assert callable(getattr(backend, name, None)), f"{backend.__name__} has no {name}()"
        assert parameters(inspect.signature(getattr(backend, name))) == parameters(expected), name


def test_the_loaded_models_and_their_sessions_are_instances_of_the_protocols(tiny_llava_fp32):
    core, path = ov.Core(), tiny_llava_fp32 / "openvino_language_model.xml"
    stateful = StatefulLanguageModel.load(core, path, "CPU", "f32")
    _, prefix, _ = frame_inputs(stateful.compiled, seed=1, prefix_tokens=8)
    for model in (load_language_model(core, path, "CPU", "f32"), stateful):
        assert isinstance(model, protocols.LanguageModel)
        assert isinstance(model.session(prefix), protocols.LanguageSession)
