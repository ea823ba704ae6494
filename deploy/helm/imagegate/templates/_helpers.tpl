{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "imagegate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "imagegate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "imagegate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "imagegate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imagegate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "imagegate.labels" -}}
helm.sh/chart: {{ include "imagegate.chart" . }}
{{ include "imagegate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "imagegate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imagegate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: the CUDA image, or its "-cpu" variant when no GPU is requested. */}}
{{- define "imagegate.image" -}}
{{- $tag := .Values.image.tag }}
{{- if not $tag }}
{{- $tag = ternary .Chart.AppVersion (printf "%s-cpu" .Chart.AppVersion) (gt (int .Values.gpu.count) 0) }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* The Secret holding keys and the token secret: the user's, or the chart's own. */}}
{{- define "imagegate.authSecretName" -}}
{{- default (printf "%s-auth" (include "imagegate.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* True ("true") when the chart renders its own auth Secret. */}}
{{- define "imagegate.chartAuthSecret" -}}
{{- if and (not .Values.auth.existingSecret) (not .Values.auth.insecureNoAuth) }}true{{ end }}
{{- end }}

{{/* Whether the chart-made Secret carries a generated API key (no keys given in values). */}}
{{- define "imagegate.generatedKey" -}}
{{- if and (include "imagegate.chartAuthSecret" .) (not .Values.auth.keysFile) (not .Values.auth.apiKeys) }}true{{ end }}
{{- end }}

{{/* Whether a keys file is mounted. */}}
{{- define "imagegate.hasKeysFile" -}}
{{- if .Values.auth.existingSecret }}{{ if .Values.auth.secretKeys.keysFile }}true{{ end }}
{{- else if and (include "imagegate.chartAuthSecret" .) .Values.auth.keysFile }}true{{ end }}
{{- end }}

{{/* The fewest replicas that run at once: what the PodDisruptionBudget protects. */}}
{{- define "imagegate.minReplicas" -}}
{{- if or .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}
{{- int .Values.autoscaling.minReplicas }}
{{- else }}
{{- int .Values.replicaCount }}
{{- end }}
{{- end }}

{{- define "imagegate.redisConfigured" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret }}true{{ end }}
{{- end }}

{{/*
Whether /data is a claim. A server locks its data dir for its whole life, so a data dir is never
shared between pods: with Redis every state that matters lives there and each pod gets an
emptyDir (only the lock is left in it); without Redis the single replica keeps its SQLite stores
and files on the claim.
*/}}
{{- define "imagegate.dataOnClaim" -}}
{{- if and .Values.persistence.data.enabled (not (include "imagegate.redisConfigured" .)) }}true{{ end }}
{{- end }}

{{/* The rollout strategy: the user's, or one that can finish with the data dir lock. */}}
{{- define "imagegate.strategy" -}}
{{- if .Values.strategy }}
{{- toYaml .Values.strategy }}
{{- else if include "imagegate.dataOnClaim" . }}
{{- /* The new pod needs the old one's claim (ReadWriteOnce) and data dir lock: replace. */}}
type: Recreate
{{- else }}
type: RollingUpdate
rollingUpdate:
  maxSurge: 1
  maxUnavailable: 0
{{- end }}
{{- end }}

{{/*
Checks that keep a release from being installed in a shape that cannot work. Included by the
Deployment so every render runs them.
*/}}
{{- define "imagegate.validate" -}}
{{- $tgps := int .Values.terminationGracePeriodSeconds }}
{{- $preStop := int .Values.lifecycle.preStopSleepSeconds }}
{{- $drain := int .Values.server.drainTimeoutSeconds }}
{{- $needed := add $preStop $drain 5 }}
{{- if le $tgps $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed lifecycle.preStopSleepSeconds (%d) + server.drainTimeoutSeconds (%d) + 5 s for uvicorn to close connections = %d; otherwise the kubelet kills the pod mid-drain and queued requests are lost" $tgps $preStop $drain $needed) }}
{{- end }}
{{- if and .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}
{{- fail "autoscaling.hpa.enabled and autoscaling.keda.enabled are exclusive: a KEDA ScaledObject makes its own HorizontalPodAutoscaler" }}
{{- end }}
{{- if and .Values.autoscaling.hpa.enabled (not .Values.autoscaling.hpa.targetCPUUtilizationPercentage) (not .Values.autoscaling.hpa.queueImagesPerPod) }}
{{- fail "autoscaling.hpa.enabled needs autoscaling.hpa.targetCPUUtilizationPercentage and/or autoscaling.hpa.queueImagesPerPod" }}
{{- end }}
{{- if and (or .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled) (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas is above autoscaling.maxReplicas" }}
{{- end }}
{{- $many := or (gt (int .Values.replicaCount) 1) .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}
{{- if and $many (not (include "imagegate.redisConfigured" .)) (not .Values.replicasWithoutRedis) }}
{{- fail "more than one replica needs redis.url (or redis.existingSecret) so replicas share jobs, quotas and usage; set replicasWithoutRedis=true to run independent replicas anyway" }}
{{- end }}
{{- if and $many (include "imagegate.dataOnClaim" .) }}
{{- fail "independent replicas (replicasWithoutRedis) cannot share one persistence.data claim: each server locks its data dir. Set persistence.data.enabled=false (an emptyDir per pod: its jobs and ledger do not survive the pod) or configure redis" }}
{{- end }}
{{- if and (include "imagegate.dataOnClaim" .) (eq (dig "type" "" (.Values.strategy | default dict)) "RollingUpdate") (ne (toString (dig "rollingUpdate" "maxSurge" 1 (.Values.strategy | default dict))) "0") }}
{{- fail "with persistence.data on a claim and no Redis, a surging RollingUpdate never finishes: the new pod waits for the old one's data dir (its lock, and a ReadWriteOnce claim). Leave strategy empty (Recreate), set rollingUpdate.maxSurge 0, or configure redis" }}
{{- end }}
{{- range $name, $_ := .Values.server.settings }}
{{- if has (upper $name) (list "HOST" "PORT" "CACHE_DIR" "DATA_DIR" "DRAIN_TIMEOUT_S" "KEYS_FILE" "API_KEYS" "TOKEN_SECRET" "REDIS_URL" "REDIS_PREFIX" "REPLICA_ID" "INSECURE_NO_AUTH" "MODEL") }}
{{- fail (printf "server.settings.%s is set by the chart from its own values (server.port, server.drainTimeoutSeconds, persistence.*, auth.*, redis.*, model); set it there" $name) }}
{{- end }}
{{- end }}
{{- end }}
