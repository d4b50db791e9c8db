"""The Go types the engine decodes request bodies into, as :mod:`gojson` shapes.

Transcribed from moby v20.10.24 (API 1.41): ``api/types/container``
(``config.go``, ``host_config.go``), ``api/types/network``,
``api/types/types.go`` (``ExecConfig``, ``ExecStartCheck``,
``NetworkCreateRequest``, ``NetworkConnect``, ``NetworkDisconnect``),
``api/types/volume/volume_create.go``, ``api/types/mount``, and the wrapper
the container-create decoder uses, ``runconfig/config_unix.go``
``ContainerConfigWrapper``.  JSON names are the Go field names unless a tag
renames them (``CPUShares`` is ``CpuShares``).  Embedded structs are listed
flat, as Go promotes their fields.

Fields that are never allowed to a tenant are marked ``refuse`` here only when
they are refused in *every* body they occur in; the per-endpoint rules live in
:mod:`rules`.
"""

from __future__ import annotations

from .gojson import (BOOL, INT, INT64, STR, UINT16, UINT32, UINT64, Empty, Field, List, Map, StrSlice,
                     Struct)

STRS = List(STR)
STRMAP = Map(STR)

HEALTH_CONFIG = Struct("HealthConfig", [
    Field("Test", STRS), Field("Interval", INT64), Field("Timeout", INT64),
    Field("StartPeriod", INT64), Field("Retries", INT),
])

# api/types/container/config.go Config
CONFIG_FIELDS = [
    Field("Hostname", STR), Field("Domainname", STR), Field("User", STR),
    Field("AttachStdin", BOOL), Field("AttachStdout", BOOL), Field("AttachStderr", BOOL),
    Field("ExposedPorts", Map(Empty())), Field("Tty", BOOL), Field("OpenStdin", BOOL),
    Field("StdinOnce", BOOL), Field("Env", STRS), Field("Cmd", StrSlice()),
    Field("Healthcheck", HEALTH_CONFIG), Field("ArgsEscaped", BOOL), Field("Image", STR),
    Field("Volumes", Map(Empty())), Field("WorkingDir", STR), Field("Entrypoint", StrSlice()),
    Field("NetworkDisabled", BOOL), Field("MacAddress", STR), Field("OnBuild", STRS),
    Field("Labels", STRMAP), Field("StopSignal", STR), Field("StopTimeout", INT),
    Field("Shell", StrSlice()),
]

LOG_CONFIG = Struct("LogConfig", [Field("Type", STR), Field("Config", STRMAP)])
RESTART_POLICY = Struct("RestartPolicy", [Field("Name", STR), Field("MaximumRetryCount", INT)])
DEVICE_MAPPING = Struct("DeviceMapping", [
    Field("PathOnHost", STR), Field("PathInContainer", STR), Field("CgroupPermissions", STR)])
DEVICE_REQUEST = Struct("DeviceRequest", [
    Field("Driver", STR), Field("Count", INT), Field("DeviceIDs", STRS),
    Field("Capabilities", List(STRS)), Field("Options", STRMAP)])
WEIGHT_DEVICE = Struct("WeightDevice", [Field("Path", STR), Field("Weight", UINT16)])
THROTTLE_DEVICE = Struct("ThrottleDevice", [Field("Path", STR), Field("Rate", UINT64)])
ULIMIT = Struct("Ulimit", [Field("Name", STR), Field("Hard", INT64), Field("Soft", INT64)])
PORT_BINDING = Struct("PortBinding", [Field("HostIp", STR), Field("HostPort", STR)])

# api/types/mount/mount.go
MOUNT = Struct("Mount", [
    Field("Type", STR), Field("Source", STR), Field("Target", STR), Field("ReadOnly", BOOL),
    Field("Consistency", STR),
    Field("BindOptions", Struct("BindOptions", [Field("Propagation", STR), Field("NonRecursive", BOOL)])),
    Field("VolumeOptions", Struct("VolumeOptions", [
        Field("NoCopy", BOOL), Field("Labels", STRMAP),
        Field("DriverConfig", Struct("Driver", [Field("Name", STR), Field("Options", STRMAP)]))])),
    Field("TmpfsOptions", Struct("TmpfsOptions", [Field("SizeBytes", INT64), Field("Mode", UINT32)])),
])

# api/types/container/host_config.go Resources (embedded in HostConfig and UpdateConfig)
RESOURCES_FIELDS = [
    Field("CpuShares", INT64), Field("Memory", INT64), Field("NanoCpus", INT64),
    Field("CgroupParent", STR), Field("BlkioWeight", UINT16),
    Field("BlkioWeightDevice", List(WEIGHT_DEVICE)),
    Field("BlkioDeviceReadBps", List(THROTTLE_DEVICE)), Field("BlkioDeviceWriteBps", List(THROTTLE_DEVICE)),
    Field("BlkioDeviceReadIOps", List(THROTTLE_DEVICE)), Field("BlkioDeviceWriteIOps", List(THROTTLE_DEVICE)),
    Field("CpuPeriod", INT64), Field("CpuQuota", INT64),
    Field("CpuRealtimePeriod", INT64), Field("CpuRealtimeRuntime", INT64),
    Field("CpusetCpus", STR), Field("CpusetMems", STR),
    Field("Devices", List(DEVICE_MAPPING)), Field("DeviceCgroupRules", STRS),
    Field("DeviceRequests", List(DEVICE_REQUEST)),
    Field("KernelMemory", INT64), Field("KernelMemoryTCP", INT64), Field("MemoryReservation", INT64),
    Field("MemorySwap", INT64), Field("MemorySwappiness", INT64), Field("OomKillDisable", BOOL),
    Field("PidsLimit", INT64), Field("Ulimits", List(ULIMIT)),
    Field("CpuCount", INT64), Field("CpuPercent", INT64),
    Field("IOMaximumIOps", UINT64), Field("IOMaximumBandwidth", UINT64),
]

HOST_CONFIG_OWN_FIELDS = [
    Field("Binds", STRS), Field("ContainerIDFile", STR), Field("LogConfig", LOG_CONFIG),
    Field("NetworkMode", STR), Field("PortBindings", Map(List(PORT_BINDING))),
    Field("RestartPolicy", RESTART_POLICY), Field("AutoRemove", BOOL), Field("VolumeDriver", STR),
    Field("VolumesFrom", STRS), Field("CapAdd", StrSlice()), Field("CapDrop", StrSlice()),
    Field("CgroupnsMode", STR), Field("Dns", STRS), Field("DnsOptions", STRS), Field("DnsSearch", STRS),
    Field("ExtraHosts", STRS), Field("GroupAdd", STRS), Field("IpcMode", STR), Field("Cgroup", STR),
    Field("Links", STRS), Field("OomScoreAdj", INT), Field("PidMode", STR), Field("Privileged", BOOL),
    Field("PublishAllPorts", BOOL), Field("ReadonlyRootfs", BOOL), Field("SecurityOpt", STRS),
    Field("StorageOpt", STRMAP), Field("Tmpfs", STRMAP), Field("UTSMode", STR), Field("UsernsMode", STR),
    Field("ShmSize", INT64), Field("Sysctls", STRMAP), Field("Runtime", STR),
    Field("ConsoleSize", List(UINT64)), Field("Isolation", STR),
    Field("Mounts", List(MOUNT)), Field("MaskedPaths", STRS), Field("ReadonlyPaths", STRS),
    Field("Init", BOOL),
]
HOST_CONFIG = Struct("HostConfig", HOST_CONFIG_OWN_FIELDS + RESOURCES_FIELDS)

ENDPOINT_SETTINGS = Struct("EndpointSettings", [
    Field("IPAMConfig", Struct("EndpointIPAMConfig", [
        Field("IPv4Address", STR), Field("IPv6Address", STR), Field("LinkLocalIPs", STRS)])),
    Field("Links", STRS), Field("Aliases", STRS), Field("NetworkID", STR), Field("EndpointID", STR),
    Field("Gateway", STR), Field("IPAddress", STR), Field("IPPrefixLen", INT), Field("IPv6Gateway", STR),
    Field("GlobalIPv6Address", STR), Field("GlobalIPv6PrefixLen", INT), Field("MacAddress", STR),
    Field("DriverOpts", STRMAP),
])
NETWORKING_CONFIG = Struct("NetworkingConfig", [Field("EndpointsConfig", Map(ENDPOINT_SETTINGS))])

_DEPRECATED = "is read by the engine only in the deprecated top-level form; put it inside HostConfig"

# runconfig ContainerConfigWrapper: embedded *Config, HostConfig (the inner one),
# Cpuset, NetworkingConfig, and embedded *HostConfig whose promoted fields the
# engine still reads (getHostConfig uses them when HostConfig is absent, and
# copies Memory, MemorySwap, CpuShares, CpusetCpus, VolumeDriver from them).
# Every promoted HostConfig field is refused outright: no supported client
# sends them, and checking two places for one setting is how checks get missed.
CONTAINER_CREATE = Struct("ContainerConfigWrapper", CONFIG_FIELDS + [
    Field("HostConfig", HOST_CONFIG),
    Field("Cpuset", STR, refuse=_DEPRECATED, always=True),
    Field("NetworkingConfig", NETWORKING_CONFIG),
] + [Field(f.name, f.shape, refuse=_DEPRECATED, always=True)
     for f in HOST_CONFIG_OWN_FIELDS + RESOURCES_FIELDS])

UPDATE_CONFIG = Struct("UpdateConfig", RESOURCES_FIELDS + [Field("RestartPolicy", RESTART_POLICY)])

EXEC_CONFIG = Struct("ExecConfig", [
    Field("User", STR), Field("Privileged", BOOL), Field("Tty", BOOL), Field("AttachStdin", BOOL),
    Field("AttachStderr", BOOL), Field("AttachStdout", BOOL), Field("Detach", BOOL),
    Field("DetachKeys", STR), Field("Env", STRS), Field("WorkingDir", STR), Field("Cmd", STRS),
])
EXEC_START = Struct("ExecStartCheck", [Field("Detach", BOOL), Field("Tty", BOOL)])

IPAM = Struct("IPAM", [
    Field("Driver", STR), Field("Options", STRMAP),
    Field("Config", List(Struct("IPAMConfig", [
        Field("Subnet", STR), Field("IPRange", STR), Field("Gateway", STR),
        Field("AuxiliaryAddresses", STRMAP)]))),
])
NETWORK_CREATE = Struct("NetworkCreateRequest", [
    Field("Name", STR), Field("CheckDuplicate", BOOL), Field("Driver", STR), Field("Scope", STR),
    Field("EnableIPv6", BOOL), Field("IPAM", IPAM), Field("Internal", BOOL), Field("Attachable", BOOL),
    Field("Ingress", BOOL), Field("ConfigOnly", BOOL),
    Field("ConfigFrom", Struct("ConfigReference", [Field("Network", STR)])),
    Field("Options", STRMAP), Field("Labels", STRMAP),
])
NETWORK_CONNECT = Struct("NetworkConnect", [Field("Container", STR), Field("EndpointConfig", ENDPOINT_SETTINGS)])
NETWORK_DISCONNECT = Struct("NetworkDisconnect", [Field("Container", STR), Field("Force", BOOL)])

VOLUME_CREATE = Struct("VolumeCreateBody", [
    Field("Driver", STR), Field("DriverOpts", STRMAP), Field("Labels", STRMAP), Field("Name", STR)])

# api/types/auth.go AuthConfig: only ServerAddress is read by the policy.
AUTH_CONFIG = Struct("AuthConfig", [
    Field("Username", STR), Field("Password", STR), Field("Auth", STR), Field("Email", STR),
    Field("ServerAddress", STR), Field("IdentityToken", STR), Field("RegistryToken", STR),
])
