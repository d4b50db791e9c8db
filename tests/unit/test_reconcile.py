"""The reconciler's pure core: records implied by labels, and the drift."""

from authz_plugin.scoping import TENANT_LABEL
from name_scoper.reconcile import Snapshot, desired, diff

TA, TB = "a" * 32, "b" * 32
C1, C2, C3 = "1" * 64, "2" * 64, "3" * 64


def snap():
    return Snapshot(
        containers=[
            {"Id": C1, "Name": f"{TA}_web", "Labels": {TENANT_LABEL: TA}, "ImageLabels": {}, "ExecIDs": ["e1"],
             "Volumes": ["f" * 64, f"{TA}_data"]},
            # inherited from its image: not trusted
            {"Id": C2, "Name": "x", "Labels": {TENANT_LABEL: TB}, "ImageLabels": {TENANT_LABEL: TB}},
            # scoped for A, labelled B: a conflict, the label wins
            {"Id": C3, "Name": f"{TA}_odd", "Labels": {TENANT_LABEL: TB}, "ImageLabels": {}},
        ],
        networks=[{"Id": "n1", "Name": f"{TA}_bridge", "Labels": {TENANT_LABEL: TA}},
                  {"Id": "n0", "Name": "bridge", "Labels": {}}, {"Id": "n2", "Name": "adminnet", "Labels": {}}],
        volumes=[{"Name": "f" * 64, "Labels": None}, {"Name": f"{TA}_data", "Labels": None},
                 {"Name": "e" * 64, "Labels": {}}, {"Name": f"{TB}_v", "Labels": {TENANT_LABEL: TB}}],
    )


def test_desired_follows_the_rules():
    d = desired(snap())
    assert d.records["container"] == {C1: (TA, f"{TA}_web"), C3: (TB, f"{TA}_odd")}
    assert d.execs == {"e1": (TA, C1)}
    assert d.records["network"] == {"n1": (TA, f"{TA}_bridge")}
    assert d.records["volume"] == {"f" * 64: (TA, ""), f"{TA}_data": (TA, ""), f"{TB}_v": (TB, "")}
    assert len(d.conflicts) == 1 and "label says" in d.conflicts[0]
    assert sorted(d.unowned) == ["container x", "network adminnet", "volume " + "e" * 64]


def test_no_drift_when_records_match():
    d = desired(snap())
    act = diff(d, d.records, dict(d.execs))
    assert act.drift == 0


def test_drift_is_repaired_and_the_label_wins():
    d = desired(snap())
    have = {"container": {C1: (TB, f"{TA}_web"), "9" * 64: (TA, "gone")}, "network": {}, "volume": {}}
    execs = {"e1": (TA, C1), "e9": (TA, C1), "ex": (TB, "0" * 64)}
    act = diff(d, have, execs)
    assert ("container", C1, TA, f"{TA}_web") in act.add
    assert ("container", "9" * 64) in act.remove
    assert ("network", "n1", TA, f"{TA}_bridge") in act.add
    assert act.remove_execs == ["e9"]  # e1 is still listed; ex belongs to another host's container
    assert act.add_execs == []


def test_engine_generated_names_are_not_conflicts():
    c = {"Id": C1, "Name": "musing_fermat", "Labels": {TENANT_LABEL: TA}, "ImageLabels": {}}
    d = desired(Snapshot(containers=[c]))
    assert d.conflicts == [] and d.records["container"] == {C1: (TA, "musing_fermat")}


class _FakeAPI:
    """Enough of docker-py's APIClient for Reconciler.full()."""

    def __init__(self, containers, after_list=None):
        self._containers = {c["Id"]: c for c in containers}
        self.after_list = after_list

    def containers(self, all=True, quiet=True):
        return [{"Id": i} for i in self._containers]

    def inspect_container(self, cid):
        c = self._containers[cid]
        return {"Id": cid, "Name": "/" + c["Name"], "Image": "img", "Config": {"Labels": c["Labels"]},
                "ExecIDs": None, "Mounts": []}

    def inspect_image(self, image):
        return {"Config": {"Labels": None}}

    def networks(self):
        return []

    def volumes(self):
        if self.after_list:
            self.after_list()  # something happens after the pass listed the containers
        return {"Volumes": []}


def test_a_full_pass_never_removes_a_record_made_while_it_runs():
    import fakeredis
    from types import SimpleNamespace
    from authz_plugin.ownership import Store
    from name_scoper.reconciler import Reconciler

    store = Store(fakeredis.FakeRedis(decode_responses=True), host="h1")
    new = {"Id": C2, "Name": f"{TA}_new", "Labels": {TENANT_LABEL: TA}}
    # a container is created (and recorded by the plugin) after the pass
    # listed the engine's containers
    api = _FakeAPI([], after_list=lambda: store.add("container", C2, TA, f"{TA}_new"))
    counts = Reconciler(SimpleNamespace(api=api), store).full()
    assert store.owner("container", C2) == TA
    assert counts["removed"] == 0
    # positive control: a record whose container is gone is removed
    store.add("container", C3, TA, f"{TA}_gone")
    counts = Reconciler(SimpleNamespace(api=_FakeAPI([new])), store).full()
    assert counts["removed"] == 1 and store.owner("container", C3) is None
