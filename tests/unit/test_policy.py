"""The authorizer end to end on fakes: identity, fakeredis, engine payloads."""

import copy

import fakeredis
import pytest

from authz_plugin.ownership import Store
from authz_plugin.scoping import NAME_LABEL, TENANT_LABEL

from .conftest import TA, TB, payload

V = "/v1.41"
CID = "c0ffee" + "0" * 58
CID_B = "c0ffef" + "1" * 58
NID = "ab12" + "2" * 60


def good(tenant=TA, **hc):
    body = {"Image": "busybox", "Labels": {TENANT_LABEL: tenant},
            "HostConfig": {"NetworkMode": "none", "PidsLimit": 100, "CgroupnsMode": "private"}}
    body["HostConfig"].update(hc)
    return body


def req(authz, *a, **kw):
    return authz.authz_request(payload(*a, **kw))


def allowed(authz, *a, **kw):
    r = req(authz, *a, **kw)
    assert r["Allow"], r.get("Msg")
    return r


def denied(authz, *a, match="", **kw):
    r = req(authz, *a, **kw)
    assert not r["Allow"], "expected a refusal"
    assert match in r["Msg"], r["Msg"]
    return r


def create_container(authz, store, tenant=TA, name=None, cid=CID, token="tok-alice", body=None):
    uri = f"{V}/containers/create" + (f"?name={name}" if name else "")
    body = body or good(tenant)
    allowed(authz, "POST", uri, body, token=token)
    res = authz.authz_response(payload("POST", uri, body, token=token, status=201,
                                       response={"Id": cid, "Warnings": []}))
    assert res["Allow"], res
    return cid


# -- identity and roles ---------------------------------------------------------

def test_no_token_and_bad_token_get_the_login_hint(authz):
    denied(authz, "GET", f"{V}/info", token=None, match="fdcs-login")
    denied(authz, "GET", f"{V}/info", token="garbage", match="fdcs-login")
    allowed(authz, "GET", f"{V}/info")


def test_reader_reads_but_does_not_write(authz):
    allowed(authz, "GET", f"{V}/images/json", token="tok-dave")
    denied(authz, "POST", f"{V}/containers/create?name={TA}_x", good(), token="tok-dave", match="reading only")


def test_reader_may_not_open_the_websocket_attach(authz, store):
    # a GET, but the engine always attaches stdin to it: a write
    cid = create_container(authz, store, name=f"{TA}_ws")
    denied(authz, "GET", f"{V}/containers/{cid}/attach/ws?stream=1&stdin=1", token="tok-dave",
           match="writes to the container")
    allowed(authz, "GET", f"{V}/containers/{cid}/json", token="tok-dave")
    allowed(authz, "GET", f"{V}/containers/{cid}/attach/ws?stream=1&stdin=1")  # a member may


def test_admin_may_do_anything_without_redis(authz, store):
    store.r.connection_pool.disconnect()
    store.r.ping = None
    allowed(authz, "GET", f"{V}/system/df", token="tok-admin")
    allowed(authz, "POST", f"{V}/containers/create", good(Privileged=True), token="tok-admin")


def test_unsupported_endpoints(authz):
    for method, uri in [("GET", f"{V}/system/df"), ("POST", f"{V}/grpc"), ("POST", f"{V}/session"),
                        ("GET", f"{V}/nothing"), ("GET", "/debug/pprof/"), ("POST", f"{V}/commit")]:
        r = req(authz, method, uri)
        assert not r["Allow"], uri
    denied(authz, "GET", f"{V}/nothing/here", match="not supported by this service")


# -- container create rules -----------------------------------------------------

def test_good_create_allowed_and_recorded(authz, store):
    create_container(authz, store, name=f"{TA}_web")
    assert store.owner("container", CID) == TA
    assert store.name_target("container", f"{TA}_web") == CID


@pytest.mark.parametrize("hc,match", [
    ({"Privileged": True}, "HostConfig.Privileged"),
    ({"CapAdd": ["SYS_ADMIN"]}, "HostConfig.CapAdd"),
    ({"CapAdd": "NET_ADMIN"}, "HostConfig.CapAdd"),
    ({"Devices": [{"PathOnHost": "/dev/sda", "PathInContainer": "/dev/sda", "CgroupPermissions": "rwm"}]}, "HostConfig.Devices"),
    ({"DeviceRequests": [{"Count": -1}]}, "HostConfig.DeviceRequests"),
    ({"DeviceCgroupRules": ["a *:* rwm"]}, "HostConfig.DeviceCgroupRules"),
    ({"BlkioDeviceReadBps": [{"Path": "/dev/sda", "Rate": 1}]}, "HostConfig.BlkioDeviceReadBps"),
    ({"NetworkMode": "host"}, "NetworkMode 'host'"),
    ({"NetworkMode": "bridge"}, "shared bridge"),
    ({"NetworkMode": "default"}, "shared bridge"),
    ({"NetworkMode": ""}, "shared bridge"),
    ({"PidMode": "host"}, "PidMode"),
    ({"IpcMode": "host"}, "IpcMode"),
    ({"UTSMode": "host"}, "UTSMode"),
    ({"UsernsMode": "host"}, "UsernsMode"),
    ({"CgroupnsMode": "host"}, "CgroupnsMode"),
    ({"SecurityOpt": ["seccomp=unconfined"]}, "SecurityOpt"),
    ({"SecurityOpt": ["apparmor=unconfined"]}, "SecurityOpt"),
    ({"SecurityOpt": ["label=disable"]}, "SecurityOpt"),
    ({"SecurityOpt": ["systempaths=unconfined"]}, "SecurityOpt"),
    ({"SecurityOpt": ['seccomp={"defaultAction":"SCMP_ACT_ALLOW"}']}, "SecurityOpt"),
    ({"MaskedPaths": []}, "MaskedPaths"),
    ({"ReadonlyPaths": []}, "ReadonlyPaths"),
    ({"Sysctls": {"net.ipv4.ip_forward": "1"}}, "Sysctls"),
    ({"CgroupParent": "/"}, "CgroupParent"),
    ({"Cgroup": "host"}, "Cgroup"),
    ({"Runtime": "io.containerd.runtime.v1.linux"}, "Runtime"),
    ({"OomKillDisable": True}, "OomKillDisable"),
    ({"OomScoreAdj": -500}, "OomScoreAdj"),
    ({"CpuRealtimeRuntime": 1000}, "CpuRealtimeRuntime"),
    ({"StorageOpt": {"size": "1G"}}, "StorageOpt"),
    ({"LogConfig": {"Type": "syslog", "Config": {}}}, "LogConfig.Type"),
    ({"LogConfig": {"Type": "json-file", "Config": {"max-size": "10g"}}}, "max-size"),
    ({"LogConfig": {"Type": "json-file", "Config": {"max-file": "100"}}}, "max-file"),
    ({"LogConfig": {"Type": "json-file", "Config": {"max-buffer-size": "1g"}}}, "LogConfig.Config"),
    ({"PidsLimit": None}, "PidsLimit must be set"),
    ({"PidsLimit": -1}, "PidsLimit"),
    ({"PidsLimit": 100000}, "PidsLimit"),
    ({"CpuShares": 100000}, "CpuShares"),
    ({"Ulimits": [{"Name": "nofile", "Soft": 1, "Hard": 10**9}]}, "Ulimits"),
    ({"Ulimits": [{"Name": "rtprio", "Soft": 1, "Hard": 1}]}, "Ulimits"),
    ({"Binds": ["/:/host"]}, "host path"),
    ({"Binds": ["/etc:/x:ro"]}, "host path"),
    ({"Binds": ["data:/x"]}, "not one of yours"),
    ({"Binds": [f"{TB}_data:/x"]}, "not one of yours"),
    ({"Mounts": [{"Type": "bind", "Source": "/", "Target": "/h"}]}, "mount type"),
    ({"Mounts": [{"Type": "npipe", "Source": "x", "Target": "/h"}]}, "mount type"),
    ({"Mounts": [{"Type": "volume", "Source": f"{TA}_v", "Target": "/v",
                  "VolumeOptions": {"DriverConfig": {"Name": "local", "Options": {"type": "none", "o": "bind", "device": "/"}}}}]}, "VolumeOptions"),
    ({"Mounts": [{"Type": "volume", "Source": f"{TA}_v", "Target": "/v", "VolumeOptions": {"Labels": {"x": "y"}}}]}, "VolumeOptions"),
    ({"VolumeDriver": "convoy"}, "VolumeDriver"),
    ({"PortBindings": {"80/tcp": [{"HostPort": "22"}]}}, "host port"),
    ({"PortBindings": {"80/tcp": [{"HostPort": "29000-30001"}]}}, "host port"),
    ({"Isolation": "hyperv"}, "Isolation"),
])
def test_dangerous_create_options_refused_naming_the_field(authz, hc, match):
    allowed(authz, "POST", f"{V}/containers/create?name={TA}_ok", good())  # positive control
    denied(authz, "POST", f"{V}/containers/create?name={TA}_bad", good(**hc), match=match)


@pytest.mark.parametrize("hc", [
    {"SecurityOpt": ["no-new-privileges"]}, {"SecurityOpt": ["no-new-privileges:true"]},
    {"CapDrop": ["ALL"]}, {"Binds": [f"{TA}_data:/data"]}, {"Binds": ["/anon"]},
    {"Mounts": [{"Type": "volume", "Source": f"{TA}_v", "Target": "/v", "VolumeOptions": {"NoCopy": True}}]},
    {"Mounts": [{"Type": "tmpfs", "Target": "/t"}]}, {"Mounts": [{"Type": "volume", "Target": "/anon"}]},
    {"PortBindings": {"80/tcp": [{"HostPort": ""}], "81/tcp": [{"HostPort": "30080"}]}},
    {"LogConfig": {"Type": "json-file", "Config": {"max-size": "5m", "max-file": "2"}}},
    {"Ulimits": [{"Name": "nofile", "Soft": 1024, "Hard": 2048}]}, {"OomScoreAdj": 500},
    {"IpcMode": "private"}, {"CgroupnsMode": "private"}, {"Runtime": "runc"}, {"MaskedPaths": None},
])
def test_allowed_create_options(authz, hc):
    allowed(authz, "POST", f"{V}/containers/create?name={TA}_ok", good(**hc))


def test_cap_add_allow_list_is_configurable(store):
    from authz_plugin.policy import Authorizer
    from .conftest import FakeIdentityService, cfg
    a = Authorizer(cfg(**{"policy.cap_add_allowed": ["NET_ADMIN"]}), FakeIdentityService(), store)
    allowed(a, "POST", f"{V}/containers/create", good(CapAdd=["CAP_net_admin"]))
    denied(a, "POST", f"{V}/containers/create", good(CapAdd=["SYS_ADMIN"]), match="CapAdd")


def test_names_and_labels(authz):
    denied(authz, "POST", f"{V}/containers/create?name=web", good(), match="scoped form")
    denied(authz, "POST", f"{V}/containers/create?name={TB}_web", good(), match="scoped form")
    allowed(authz, "POST", f"{V}/containers/create?name=/{TA}_web", good())
    allowed(authz, "POST", f"{V}/containers/create?name={TA}_web&name=web", good())  # the engine reads the first
    denied(authz, "POST", f"{V}/containers/create?name=web&name={TA}_web", good(), match="scoped form")
    denied(authz, "POST", f"{V}/containers/create", good(TB), match=TENANT_LABEL)
    body = good()
    del body["Labels"]
    denied(authz, "POST", f"{V}/containers/create", body, match=TENANT_LABEL)
    body = good()
    body["Labels"][NAME_LABEL] = "other"
    denied(authz, "POST", f"{V}/containers/create?name={TA}_web", body, match=NAME_LABEL)
    body["Labels"][NAME_LABEL] = "web"
    allowed(authz, "POST", f"{V}/containers/create?name={TA}_web", body)
    body["Labels"]["org.fiware.fdcs.quota"] = "x"
    denied(authz, "POST", f"{V}/containers/create?name={TA}_web", body, match="reserved")


def test_case_variant_and_top_level_bypasses(authz):
    body = good()
    body["hostconfig"] = {"Privileged": True}
    denied(authz, "POST", f"{V}/containers/create", body, match="more than once")
    body = {"Image": "busybox", "Labels": {TENANT_LABEL: TA}, "hostConfig": {"NetworkMode": "none", "PidsLimit": 5, "privileged": True}}
    denied(authz, "POST", f"{V}/containers/create", body, match="Privileged")
    body = good()
    body["Privileged"] = True
    denied(authz, "POST", f"{V}/containers/create", body, match="deprecated top-level")


def test_create_needs_a_body(authz):
    p = payload("POST", f"{V}/containers/create", None)
    p["RequestHeaders"]["Content-Type"] = "application/json"
    p["RequestHeaders"]["Content-Length"] = str(2 * 1024 * 1024)  # the engine dropped it
    r = authz.authz_request(p)
    assert not r["Allow"] and "1 MiB" in r["Msg"]


def test_references_in_create_must_be_owned(authz, store):
    create_container(authz, store, name=f"{TA}_db")
    store.add("container", CID_B, TB, f"{TB}_db")
    store.add("network", NID, TB, f"{TB}_net")
    for hc, ok in [({"VolumesFrom": [f"{TA}_db"]}, True), ({"VolumesFrom": [f"{TB}_db:ro"]}, False),
                   ({"VolumesFrom": [CID_B[:12]]}, False), ({"VolumesFrom": [CID[:12]]}, True),
                   ({"Links": [f"/{TA}_db:db"]}, True), ({"Links": [f"{TB}_db:db"]}, False),
                   ({"NetworkMode": f"container:{TA}_db"}, True), ({"NetworkMode": f"container:{CID_B}"}, False),
                   ({"PidMode": f"container:{TB}_db"}, False), ({"IpcMode": f"container:{CID[:6]}"}, True),
                   ({"NetworkMode": f"{TB}_net"}, False), ({"NetworkMode": NID[:6]}, False),
                   ({"NetworkMode": "web"}, False)]:
        r = req(authz, "POST", f"{V}/containers/create", good(**hc))
        assert r["Allow"] == ok, (hc, r)
        if not ok:
            assert "No such container" in r["Msg"] or "not found" in r["Msg"]


def test_endpoints_config(authz, store):
    store.add("network", NID, TA, f"{TA}_net")
    body = good(NetworkMode=f"{TA}_net")
    body["NetworkingConfig"] = {"EndpointsConfig": {f"{TA}_net": {"Aliases": ["web"]}}}
    allowed(authz, "POST", f"{V}/containers/create", body)
    for key, value in [("IPAMConfig", {"IPv4Address": "10.0.0.5"}), ("IPAddress", "10.0.0.5"),
                       ("MacAddress", "02:42:ac:11:00:02"), ("NetworkID", "bridge"), ("DriverOpts", {"a": "b"})]:
        b = copy.deepcopy(body)
        b["NetworkingConfig"]["EndpointsConfig"][f"{TA}_net"][key] = value
        denied(authz, "POST", f"{V}/containers/create", b, match=key)
    b = copy.deepcopy(body)
    b["NetworkingConfig"]["EndpointsConfig"] = {f"{TB}_net": {}}
    denied(authz, "POST", f"{V}/containers/create", b, match="not found")


# -- ownership of path references -------------------------------------------------

def test_own_by_name_id_and_prefix(authz, store):
    create_container(authz, store, name=f"{TA}_web")
    for ref in (f"{TA}_web", CID, CID[:12], CID[:3]):
        allowed(authz, "GET", f"{V}/containers/{ref}/json")
        denied(authz, "GET", f"{V}/containers/{ref}/json", token="tok-bob", match="No such container")
    denied(authz, "GET", f"{V}/containers/web/json", token="tok-alice", match="No such container: web")


def test_prefix_matching_a_foreign_container_is_refused(authz, store):
    create_container(authz, store)
    store.add("container", CID_B, TB)
    allowed(authz, "GET", f"{V}/containers/{CID[:6]}/json")
    denied(authz, "GET", f"{V}/containers/{CID[:5]}/json", match="No such container")  # c0ffe: both match


def test_every_container_verb_is_refused_for_another_tenant(authz, store):
    create_container(authz, store, name=f"{TA}_web")
    verbs = [("GET", "json"), ("GET", "logs"), ("GET", "top"), ("GET", "stats"), ("GET", "changes"),
             ("GET", "export"), ("GET", "archive"), ("HEAD", "archive"), ("GET", "attach/ws"),
             ("POST", "start"), ("POST", "stop"), ("POST", "restart"), ("POST", "kill"), ("POST", "pause"),
             ("POST", "unpause"), ("POST", "wait"), ("POST", "resize"), ("POST", "attach")]
    for ref in (f"{TA}_web", CID, CID[:12]):
        for method, verb in verbs:
            allowed(authz, method, f"{V}/containers/{ref}/{verb}")
            denied(authz, method, f"{V}/containers/{ref}/{verb}", token="tok-bob", match="No such container")
        allowed(authz, "DELETE", f"{V}/containers/{ref}")
        denied(authz, "DELETE", f"{V}/containers/{ref}", token="tok-bob")
        allowed(authz, "POST", f"{V}/containers/{ref}/update", {"CpuShares": 512})
        denied(authz, "POST", f"{V}/containers/{ref}/update", {"CpuShares": 512}, token="tok-bob")
        allowed(authz, "POST", f"{V}/containers/{ref}/exec", {"Cmd": ["true"]})
        denied(authz, "POST", f"{V}/containers/{ref}/exec", {"Cmd": ["true"]}, token="tok-bob")
        allowed(authz, "POST", f"{V}/containers/{ref}/rename?name={TA}_new")
        denied(authz, "POST", f"{V}/containers/{ref}/rename?name={TB}_new", token="tok-bob")
    denied(authz, "POST", f"{V}/containers/{CID}/rename?name={TB}_x", match="scoped form")
    denied(authz, "POST", f"{V}/containers/{CID}/exec", {"Cmd": ["sh"], "Privileged": True}, match="Privileged")
    denied(authz, "POST", f"{V}/containers/{CID}/update", {"Devices": [{"PathOnHost": "/dev/kmsg"}]}, match="Devices")
    denied(authz, "POST", f"{V}/containers/{CID}/update", {"PidsLimit": 0}, match="PidsLimit")


def test_body_on_an_endpoint_that_takes_none(authz, store):
    create_container(authz, store, name=f"{TA}_web")
    denied(authz, "POST", f"{V}/containers/{TA}_web/start", {"Privileged": True}, match="takes no request body")
    p = payload("POST", f"{V}/containers/{TA}_web/rename?name={TA}_x")
    del p["RequestHeaders"]["Content-Length"]  # chunked
    assert not authz.authz_request(p)["Allow"]


def test_exec_ownership_recorded_and_checked(authz, store):
    create_container(authz, store, name=f"{TA}_web")
    uri = f"{V}/containers/{TA}_web/exec"
    eid = "e" * 64
    authz.authz_response(payload("POST", uri, {"Cmd": ["true"]}, status=201, response={"Id": eid}))
    assert store.owner("exec", eid) == TA
    allowed(authz, "POST", f"{V}/exec/{eid}/start", {"Detach": False, "Tty": False})
    allowed(authz, "GET", f"{V}/exec/{eid}/json")
    denied(authz, "GET", f"{V}/exec/{eid}/json", token="tok-bob", match="No such exec")
    denied(authz, "POST", f"{V}/exec/{eid}/start", {"Detach": False}, token="tok-bob")
    denied(authz, "POST", f"{V}/exec/{'f' * 64}/resize", match="No such exec")


def test_remove_and_rename_update_records(authz, store):
    create_container(authz, store, name=f"{TA}_web")
    authz.authz_response(payload("POST", f"{V}/containers/{CID[:8]}/rename?name={TA}_new", status=204, response={}))
    assert store.name_target("container", f"{TA}_new") == CID
    assert store.name_target("container", f"{TA}_web") is None
    authz.authz_response(payload("DELETE", f"{V}/containers/{TA}_new", status=204, response={}))
    assert store.owner("container", CID) is None
    assert store.r.zcard(f"fdcs:ids:container:{store.host}") == 0


def test_failed_create_is_not_recorded(authz, store):
    uri = f"{V}/containers/create?name={TA}_web"
    r = authz.authz_response(payload("POST", uri, good(), status=None, response=None))
    assert r["Allow"] and store.owner("container", CID) is None


# -- networks and volumes -------------------------------------------------------

def test_network_create_rules(authz, store):
    ok = {"Name": f"{TA}_net", "Driver": "bridge", "Labels": {TENANT_LABEL: TA},
          "IPAM": {"Driver": "default", "Config": [], "Options": {}}, "Options": {}, "Internal": True}
    allowed(authz, "POST", f"{V}/networks/create", ok)
    for change, match in [({"Driver": "macvlan"}, "Driver"), ({"EnableIPv6": True}, "EnableIPv6"),
                          ({"Options": {"com.docker.network.bridge.name": "docker0"}}, "Options"),
                          ({"IPAM": {"Config": [{"Subnet": "10.0.0.0/8"}]}}, "IPAM"),
                          ({"ConfigFrom": {"Network": "x"}}, "ConfigFrom"), ({"Ingress": True}, "Ingress"),
                          ({"Name": "net"}, "scoped form"), ({"Name": f"{TB}_net"}, "scoped form"),
                          ({"Labels": {}}, TENANT_LABEL)]:
        denied(authz, "POST", f"{V}/networks/create", {**ok, **change}, match=match)
    authz.authz_response(payload("POST", f"{V}/networks/create", ok, status=201, response={"Id": NID, "Warning": ""}))
    assert store.owner("network", NID) == TA
    allowed(authz, "GET", f"{V}/networks/{NID[:6]}")
    denied(authz, "GET", f"{V}/networks/{NID[:6]}", token="tok-bob", match="not found")
    denied(authz, "DELETE", f"{V}/networks/{TA}_net", token="tok-bob")


def test_network_connect(authz, store):
    create_container(authz, store, name=f"{TA}_web")
    store.add("container", CID_B, TB, f"{TB}_web")
    store.add("network", NID, TA, f"{TA}_net")
    allowed(authz, "POST", f"{V}/networks/{TA}_net/connect", {"Container": f"{TA}_web", "EndpointConfig": {"Aliases": ["web"]}})
    denied(authz, "POST", f"{V}/networks/{TA}_net/connect", {"Container": CID_B}, match="No such container")
    denied(authz, "POST", f"{V}/networks/{TA}_net/connect", {"Container": f"{TA}_web", "EndpointConfig": {"IPAddress": "1.2.3.4"}}, match="IPAddress")
    denied(authz, "POST", f"{V}/networks/{TA}_net/disconnect", {"Container": CID_B, "Force": True}, match="No such container")


def test_volume_create_and_existing_volume(authz, store):
    ok = {"Name": f"{TA}_data", "Driver": "local", "DriverOpts": {}, "Labels": {TENANT_LABEL: TA}}
    allowed(authz, "POST", f"{V}/volumes/create", ok)
    denied(authz, "POST", f"{V}/volumes/create", {**ok, "DriverOpts": {"type": "none", "o": "bind", "device": "/"}}, match="DriverOpts")
    denied(authz, "POST", f"{V}/volumes/create", {**ok, "Driver": "nfs"}, match="Driver")
    denied(authz, "POST", f"{V}/volumes/create", {**ok, "Name": ""}, match="Name")
    # an existing volume with foreign labels answered with 201 is not taken over
    authz.authz_response(payload("POST", f"{V}/volumes/create", ok, status=201,
                                 response={"Name": f"{TA}_data", "Labels": {TENANT_LABEL: TB}}))
    assert store.owner("volume", f"{TA}_data") is None
    authz.authz_response(payload("POST", f"{V}/volumes/create", ok, status=201,
                                 response={"Name": f"{TA}_data", "Labels": {TENANT_LABEL: TA}}))
    assert store.owner("volume", f"{TA}_data") == TA
    allowed(authz, "GET", f"{V}/volumes/{TA}_data")
    denied(authz, "GET", f"{V}/volumes/{TA}_data", token="tok-bob", match="no such volume")
    store.add_volume_if_new("f" * 64, TB)
    denied(authz, "DELETE", f"{V}/volumes/{'f' * 64}", match="no such volume")
    allowed(authz, "DELETE", f"{V}/volumes/{'f' * 64}", token="tok-bob")


def test_implicit_volumes_of_a_create_become_the_creators(authz, store):
    create_container(authz, store, body=good(Binds=[f"{TA}_data:/data"]))
    assert store.owner("volume", f"{TA}_data") == TA


# -- lists, filters ------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/containers/json", "/networks", "/volumes", "/events"])
def test_lists_need_the_tenant_filter(authz, path):
    import json, urllib.parse
    q = lambda f: "?filters=" + urllib.parse.quote(json.dumps(f))
    allowed(authz, "GET", f"{V}{path}{q({'label': [f'{TENANT_LABEL}={TA}']})}")
    allowed(authz, "GET", f"{V}{path}{q({'label': {f'{TENANT_LABEL}={TA}': True}, 'name': ['x']})}")
    denied(authz, "GET", f"{V}{path}", match="tenant label")
    denied(authz, "GET", f"{V}{path}{q({'label': [f'{TENANT_LABEL}={TB}']})}", match="tenant label")
    denied(authz, "GET", f"{V}{path}{q({'label': [f'{TENANT_LABEL}={TA}', f'{TENANT_LABEL}={TB}']})}", match="another tenant")
    good_q = q({'label': [f'{TENANT_LABEL}={TA}']})
    denied(authz, "GET", f"{V}{path}{good_q}&filters=%7B%7D", match="more than once")
    raw = '{"label":["%s=%s"],"label":[]}' % (TENANT_LABEL, TA)
    denied(authz, "GET", f"{V}{path}?filters={urllib.parse.quote(raw)}", match="more than once")


def test_prune_removes_records(authz, store):
    import json, urllib.parse
    create_container(authz, store, name=f"{TA}_web")
    uri = f"{V}/containers/prune?filters=" + urllib.parse.quote(json.dumps({"label": [f"{TENANT_LABEL}={TA}"]}))
    allowed(authz, "POST", uri)
    authz.authz_response(payload("POST", uri, status=200, response={"ContainersDeleted": [CID], "SpaceReclaimed": 0}))
    assert store.owner("container", CID) is None


# -- images and registries ---------------------------------------------------------

def test_images(authz):
    allowed(authz, "GET", f"{V}/images/json")
    allowed(authz, "GET", f"{V}/images/library/busybox:latest/json")
    allowed(authz, "POST", f"{V}/images/create?fromImage=busybox&tag=latest")
    denied(authz, "POST", f"{V}/images/create?fromImage=evil.example:5000/x", match="allow-list")
    denied(authz, "POST", f"{V}/images/create?fromSrc=-&repo=x", match="administrators")
    denied(authz, "POST", f"{V}/images/create?fromImage=&fromImage=busybox", match="administrators")
    for method, uri in [("POST", f"{V}/images/busybox/tag?repo=x"), ("DELETE", f"{V}/images/busybox"),
                        ("POST", f"{V}/images/load"), ("POST", f"{V}/build"), ("GET", f"{V}/images/get")]:
        denied(authz, method, uri, match="administrators")
    allowed(authz, "POST", f"{V}/auth", {"Username": "u", "Password": "p", "ServerAddress": "https://index.docker.io/v1/"})
    denied(authz, "POST", f"{V}/auth", {"Username": "u", "Password": "p", "ServerAddress": "evil.example"}, match="allow-list")


# -- faults ------------------------------------------------------------------------------

def test_redis_down_denies_tenants_with_a_clear_message(authz, store):
    import redis

    def boom(*a, **k):
        raise redis.ConnectionError("down")
    create_container(authz, store, name=f"{TA}_web")
    store._resolve = boom
    denied(authz, "GET", f"{V}/containers/{CID[:12]}/json", match="ownership store unavailable")
    allowed(authz, "GET", f"{V}/containers/{TA}_web/json")  # a scoped name needs no lookup
    allowed(authz, "GET", f"{V}/containers/{CID}/json", token="tok-admin")


def test_internal_error_denies(authz):
    authz.identity = None
    r = authz.authz_request(payload("GET", f"{V}/info"))
    assert not r["Allow"] and "internal error" in r["Msg"]


# -- several hosts, state loss ------------------------------------------------------

def test_container_names_are_unique_across_hosts(authz, store, store_h2):
    from authz_plugin.policy import Authorizer
    from .conftest import FakeIdentityService, cfg
    authz2 = Authorizer(cfg(**{"host.id": "h2"}), FakeIdentityService(), store_h2)
    create_container(authz, store, name=f"{TA}_web")
    denied(authz2, "POST", f"{V}/containers/create?name={TA}_web", good(), match="in use on host h1")
    allowed(authz2, "POST", f"{V}/containers/create?name={TA}_other", good())  # positive control
    # removing it on h1 frees the name for h2
    authz.authz_response(payload("DELETE", f"{V}/containers/{TA}_web", status=204, response={}))
    allowed(authz2, "POST", f"{V}/containers/create?name={TA}_web", good())


def test_a_name_being_created_is_reserved_and_released_on_failure(authz, store, store_h2):
    from authz_plugin.policy import Authorizer
    from .conftest import FakeIdentityService, cfg
    authz2 = Authorizer(cfg(**{"host.id": "h2"}), FakeIdentityService(), store_h2)
    uri = f"{V}/containers/create?name={TA}_race"
    allowed(authz, "POST", uri, good())                      # h1 reserved it
    denied(authz2, "POST", uri, good(), match="in use on host h1")  # h2 loses the race
    authz.authz_response(payload("POST", uri, good(), status=None, response=None))  # the engine failed
    allowed(authz2, "POST", uri, good())                     # released


def test_per_host_names_option(store, store_h2):
    from authz_plugin.policy import Authorizer
    from .conftest import FakeIdentityService, cfg
    a1 = Authorizer(cfg(**{"policy.container_names": "host"}), FakeIdentityService(), store)
    a2 = Authorizer(cfg(**{"host.id": "h2", "policy.container_names": "host"}), FakeIdentityService(), store_h2)
    create_container(a1, store, name=f"{TA}_web")
    allowed(a2, "POST", f"{V}/containers/create?name={TA}_web", good())


def test_records_are_per_host(authz, store, store_h2):
    create_container(authz, store, name=f"{TA}_web")
    assert store.records("container") == {CID: (TA, f"{TA}_web")}
    assert store_h2.records("container") == {}
    assert store_h2.name_target("container", f"{TA}_web") is None


def test_unknown_references_are_retry_while_records_are_rebuilt(authz, store):
    create_container(authz, store, name=f"{TA}_web")
    store.r.flushall()  # Redis came back empty
    denied(authz, "GET", f"{V}/containers/{CID[:12]}/json", match="retry")
    denied(authz, "GET", f"{V}/containers/{CID[:12]}/json", token="tok-bob", match="retry")
    allowed(authz, "GET", f"{V}/containers/{TA}_web/json")  # a scoped name needs no record
    store.add("container", CID, TA, f"{TA}_web")
    store.mark_complete(1)  # the reconciler finished
    allowed(authz, "GET", f"{V}/containers/{CID[:12]}/json")
    denied(authz, "GET", f"{V}/containers/{CID[:12]}/json", token="tok-bob", match="No such container")
    denied(authz, "GET", f"{V}/containers/{'9' * 12}/json", match="No such container")


def test_a_marker_of_another_redis_run_does_not_count(authz, store):
    """Redis restored from an older snapshot keeps the markers of the run that
    saved it: they must not make the records look complete (finding F3)."""
    create_container(authz, store, name=f"{TA}_web")
    store.r.hset("fdcs:reconciled", "h1", "1 0123abcd")  # written on another Redis run
    assert not store.is_complete()
    denied(authz, "GET", f"{V}/containers/{'9' * 12}/json", match="retry")
    store.mark_complete(2)  # this run's pass
    assert store.is_complete()
    denied(authz, "GET", f"{V}/containers/{'9' * 12}/json", match="No such container")


def test_container_names_wait_until_every_host_can_have_reconciled(redis_server):
    """After a loss of data a cluster-wide name is reserved only once
    ``settle`` seconds have passed since the first pass on this Redis run
    (finding F2): before, another host's holder may not be recorded yet."""
    from authz_plugin.policy import Authorizer
    from .conftest import FakeIdentityService, cfg
    st = Store(fakeredis.FakeRedis(server=redis_server, decode_responses=True), host="h1", settle=60)
    st.mark_complete(1)  # the first pass on this run: the epoch is now
    authz = Authorizer(cfg(), FakeIdentityService(), st)
    assert not st.settled()
    denied(authz, "POST", f"{V}/containers/create?name={TA}_web", good(), match="retry")
    allowed(authz, "POST", f"{V}/containers/create", good())  # positive control: no name, no wait
    now = int(st.r.time()[0])
    st.r.set("fdcs:epoch", f" {now - 61}")  # this run (fakeredis has no run id), 61 s ago
    assert st.settled()
    allowed(authz, "POST", f"{V}/containers/create?name={TA}_web", good())


def test_retire_host(store, store_h2, authz):
    create_container(authz, store, name=f"{TA}_web")
    store_h2.add("container", CID_B, TB, f"{TB}_x")
    assert store.retire_host() == 1
    assert store.owner("container", CID) is None and store.owner("container", CID_B) == TB


def test_sentinel_configuration_gives_a_sentinel_managed_client():
    import redis.sentinel
    from authz_plugin.ownership import connect
    from .conftest import cfg
    client = connect(cfg(**{"redis.sentinels": ["127.0.0.1:26379", "127.0.0.2:26380"],
                            "redis.service_name": "fdcs-main"}))
    pool = client.connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
    assert pool.service_name == "fdcs-main"
    assert [c.connection_pool.connection_kwargs["port"] for c in pool.sentinel_manager.sentinels] == [26379, 26380]
    plain = connect(cfg())  # positive control: a URL gives a plain client
    assert not isinstance(plain.connection_pool, redis.sentinel.SentinelConnectionPool)


def test_a_failed_duplicate_on_the_same_host_keeps_the_reservation(authz, store, store_h2):
    """Seen in CI: two creates of one name on host 2 and one on host 1 at
    once; host 2's loser (a 409 from its engine) released the reservation
    its sibling still needed, and host 1's create won as well."""
    from authz_plugin.policy import Authorizer
    from .conftest import FakeIdentityService, cfg
    authz2 = Authorizer(cfg(**{"host.id": "h2"}), FakeIdentityService(), store_h2)
    uri = f"{V}/containers/create?name={TA}_dup"
    allowed(authz2, "POST", uri, good())   # h2, request A
    allowed(authz2, "POST", uri, good())   # h2, request B (the engine will answer one of them 409)
    authz2.authz_response(payload("POST", uri, good(), status=None, response=None))  # B failed
    denied(authz, "POST", uri, good(), match="in use on host h2")  # A still holds it against h1
    authz2.authz_response(payload("POST", uri, good(), status=201, response={"Id": CID_B, "Warnings": []}))
    denied(authz, "POST", uri, good(), match="in use on host h2")  # now held by the record
    # positive control: when every request of h2 failed, the name is free
    uri2 = f"{V}/containers/create?name={TA}_free"
    allowed(authz2, "POST", uri2, good())
    allowed(authz2, "POST", uri2, good())
    authz2.authz_response(payload("POST", uri2, good(), status=None, response=None))
    authz2.authz_response(payload("POST", uri2, good(), status=None, response=None))
    allowed(authz, "POST", uri2, good())


# -- /_ping and the response hook's identity ---------------------------------------


def test_anyone_may_ping_so_that_clients_negotiate_the_version(authz):
    for uri in ("/_ping", f"{V}/_ping"):
        assert req(authz, "GET", uri, token=None)["Allow"]
        assert req(authz, "HEAD", uri, token="garbage")["Allow"]
    denied(authz, "GET", f"{V}/info", token=None, match="fdcs-login")  # everything else still needs one
    denied(authz, "POST", f"{V}/_ping", token=None)


class _KeystoneDown:
    """The fake identity service, with Keystone unreachable for tokens it has not seen."""

    def __init__(self):
        from .conftest import FakeIdentityService
        self.inner = FakeIdentityService()
        self.down = False

    def authenticate(self, headers, source=""):
        from authz_plugin.errors import IdentityUnavailable
        if self.down:
            raise IdentityUnavailable("identity service unavailable, retry later")
        return self.inner.authenticate(headers, source)


def test_a_create_is_recorded_even_when_keystone_fails_between_the_hooks(store):
    from authz_plugin.policy import Authorizer

    from .conftest import cfg
    ident = _KeystoneDown()
    authz = Authorizer(cfg(), ident, store)
    uri = f"{V}/containers/create?name={TA}_web"
    allowed(authz, "POST", uri, good())
    ident.down = True
    res = authz.authz_response(payload("POST", uri, good(), status=201, response={"Id": CID, "Warnings": []}))
    assert res["Allow"], res
    assert store.owner("container", CID) == TA
    # a response no request hook admitted (another body) is not recorded on trust
    other = good(Env=["X=1"])
    res = authz.authz_response(payload("POST", uri, other, status=201, response={"Id": CID_B, "Warnings": []}))
    assert not res["Allow"] and "identity service unavailable" in res["Msg"]
    assert store.owner("container", CID_B) is None


def test_the_cgroup_namespace_must_be_private(authz):
    # left empty, the engine uses the host's cgroup namespace on cgroup v1 hosts
    for mode in (None, ""):
        body = good()
        if mode is None:
            del body["HostConfig"]["CgroupnsMode"]
        else:
            body["HostConfig"]["CgroupnsMode"] = mode
        denied(authz, "POST", f"{V}/containers/create", body, match="CgroupnsMode must be 'private'")
    denied(authz, "POST", f"{V}/containers/create", good(CgroupnsMode="host"), match="CgroupnsMode 'host'")
    allowed(authz, "POST", f"{V}/containers/create", good())


def test_an_explicit_log_driver_needs_max_size(authz):
    # the local driver's own default is 20 MiB a file
    denied(authz, "POST", f"{V}/containers/create", good(LogConfig={"Type": "local", "Config": {}}),
           match="max-size is required")
    allowed(authz, "POST", f"{V}/containers/create", good(LogConfig={"Type": "local", "Config": {"max-size": "5m"}}))
    allowed(authz, "POST", f"{V}/containers/create", good(LogConfig={"Type": "", "Config": {}}))


def test_a_full_id_counts_only_on_its_own_host(authz, store, store_h2):
    """A full id of another host's container is, to this host's engine, a
    name and a prefix like any other string (moby's GetContainer: id, name,
    prefix): an unowned container of this host named like it must not be
    reached through the owner's record on the other host."""
    store_h2.add("container", CID, TA, f"{TA}_web")  # alice's, on h2
    # positive control: on its own host the full id is alice's
    assert store_h2.resolve([("container", CID, True)])[0].owned_by(TA)
    # on h1 nothing is known by that id...
    res = store.resolve([("container", CID, True)])[0]
    assert res.how == "none" and not res.owned_by(TA)
    denied(authz, "GET", f"{V}/containers/{CID}/json", match="No such container")
    # ...and an unowned container of h1 named like the id is nobody's
    store.set_unowned_names({"container": {CID}})
    res = store.resolve([("container", CID, True)])[0]
    assert res.how == "name" and not res.owned_by(TA)
    denied(authz, "GET", f"{V}/containers/{CID}/json", match="No such container")
    # the scoper's translation reads the same: not alice's id on h1
    assert store.tenant_ref("container", TA, CID, f"{TA}_{CID}")[0] != "id"
    assert store_h2.tenant_ref("container", TA, CID, f"{TA}_{CID}") == ("id", CID)
