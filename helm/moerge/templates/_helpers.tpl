{{/* Names ------------------------------------------------------------------------------------ */}}

{{- define "moerge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The RayService's name; KubeRay appends suffixes (-serve-svc, -raycluster-xxxxx), so keep it short. */}}
{{- define "moerge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "moerge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "moerge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moerge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "moerge.labels" -}}
helm.sh/chart: {{ include "moerge.chart" . }}
{{ include "moerge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The moerge image; pass (dict "image" .Values.image "root" .). */}}
{{- define "moerge.image" -}}
{{- $repository := .image.repository | default .root.Values.image.repository }}
{{- $tag := .image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- printf "%s:%s" $repository (toString $tag) }}
{{- end }}

{{/* Database ---------------------------------------------------------------------------------- */}}

{{- define "moerge.postgresql.fullname" -}}
{{- printf "%s-postgresql" (include "moerge.fullname" .) }}
{{- end }}

{{- define "moerge.postgresql.host" -}}
{{- printf "%s.%s.svc.%s" (include "moerge.postgresql.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/* The Secret that holds MOERGE_DATABASE_URL (made by the chart unless database.existingSecret). */}}
{{- define "moerge.database.secretName" -}}
{{- if and (not .Values.postgresql.enabled) .Values.database.existingSecret }}
{{- .Values.database.existingSecret }}
{{- else }}
{{- printf "%s-database" (include "moerge.fullname" .) }}
{{- end }}
{{- end }}

{{- define "moerge.database.secretKey" -}}
{{- if and (not .Values.postgresql.enabled) .Values.database.existingSecret }}
{{- .Values.database.existingSecretKey | default "database-url" }}
{{- else -}}
database-url
{{- end }}
{{- end }}

{{/* Fails the render, with a message that says what to set, when the database settings do not add up. */}}
{{- define "moerge.database.validate" -}}
{{- if .Values.postgresql.enabled }}
{{- if or .Values.database.url .Values.database.existingSecret }}
{{- fail "database.url / database.existingSecret name an external database: set postgresql.enabled=false to use it (or unset them to use the bundled PostgreSQL)" }}
{{- end }}
{{- else }}
{{- if and .Values.database.url .Values.database.existingSecret }}
{{- fail "set either database.url or database.existingSecret, not both" }}
{{- end }}
{{- if not .Values.database.existingSecret }}
{{- $url := required "postgresql.enabled=false: set database.url (postgresql+psycopg://USER:PASSWORD@HOST:5432/DB) or database.existingSecret" .Values.database.url }}
{{- if not (hasPrefix "postgresql+psycopg://" $url) }}
{{- fail (printf "database.url must start with postgresql+psycopg:// (moerge's driver is psycopg 3), got %s://..." (regexReplaceAll "://.*$" $url "")) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Pods ------------------------------------------------------------------------------------- */}}

{{/* Environment of every moerge container. */}}
{{- define "moerge.env" -}}
- name: MOERGE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "moerge.database.secretName" . }}
      key: {{ include "moerge.database.secretKey" . }}
- name: MOERGE_HOME
  value: {{ .Values.persistence.mountPath | quote }}
{{- if .Values.env.hfHubOffline }}
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
{{- end }}
{{- if eq (.Values.serve.ingress | default "haproxy") "haproxy" }}
{{- /* Ray Serve's high-throughput ingress (services/serving/ingress.py, INGRESS_ENV["haproxy"]):
     every Ray process reads these when it imports Serve, so they go in the pod specs. */}}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
- name: RAY_SERVE_USE_GRPC_BY_DEFAULT
  value: "1"
- name: RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE
  value: "1000"
- name: RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S
  value: "1"
- name: RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT
  value: "30000"
- name: RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT
  value: "31000"
{{- end }}
{{- with .Values.env.extra }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "moerge.pvcName" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-home" (include "moerge.fullname" .)) }}
{{- end }}

{{/* Volumes of every Ray pod: the artifact store and a memory-backed /dev/shm. */}}
{{- define "moerge.ray.volumes" -}}
- name: moerge-home
  persistentVolumeClaim:
    claimName: {{ include "moerge.pvcName" . }}
- name: dshm
  emptyDir:
    medium: Memory
    {{- with .Values.ray.shmSize }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}

{{- define "moerge.ray.volumeMounts" -}}
- name: moerge-home
  mountPath: {{ .Values.persistence.mountPath }}
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{/* rayStartParams: KubeRay's schema takes strings only. */}}
{{- define "moerge.ray.startParams" -}}
{{- $params := dict }}
{{- range $key, $value := . }}
{{- $_ := set $params $key (toString $value) }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/* Scheduling of one group; pass the group's values. */}}
{{- define "moerge.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The Serve config of the RayService: one application, moerge's, with the serve config as its args. */}}
{{- define "moerge.serveConfigV2" -}}
{{- $app := dict "name" "moerge" "route_prefix" "/" "import_path" "services.serving.app:build_app" "args" (dict "config" .Values.serve) }}
{{- $http := dict "host" .Values.serve.host "port" .Values.serve.port }}
{{- toYaml (dict "http_options" $http "applications" (list $app)) }}
{{- end }}
