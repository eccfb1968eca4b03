{{/* The chart's name, or nameOverride. */}}
{{- define "sluice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* release-chart, or fullnameOverride; the release name alone when it already holds the chart's. */}}
{{- define "sluice.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sluice.controlPlane.fullname" -}}
{{- printf "%s-control-plane" (include "sluice.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sluice.dataPlane.fullname" -}}
{{- printf "%s-data-plane" (include "sluice.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "sluice.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one plane: pass (dict "root" $ "component" "control-plane"). */}}
{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "sluice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sluice.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image: pass (dict "root" $ "binary" "sluice-cp" "tag" <the plane's imageTag>). */}}
{{- define "sluice.image" -}}
{{- printf "%s/%s:%s" .root.Values.image.repository .binary (.tag | default .root.Values.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}

{{- define "sluice.databaseSecret" -}}
{{- default (printf "%s-registry" (include "sluice.fullname" .)) .Values.controlPlane.database.existingSecret -}}
{{- end -}}

{{- define "sluice.adminTokenSecret" -}}
{{- default (printf "%s-admin-token" (include "sluice.fullname" .)) .Values.controlPlane.adminToken.existingSecret -}}
{{- end -}}

{{/* The control plane's environment shared by the Deployment and the migration Job. */}}
{{- define "sluice.controlPlane.databaseEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "sluice.databaseSecret" . }}
      key: {{ .Values.controlPlane.database.secretKey }}
- name: RUST_LOG
  value: {{ .Values.controlPlane.logLevel | quote }}
{{- end -}}

{{/* Default anti-affinity: replicas of one plane preferably on different nodes. */}}
{{- define "sluice.antiAffinity" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "sluice.selectorLabels" . | nindent 12 }}
{{- end -}}
