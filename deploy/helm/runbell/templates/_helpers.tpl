{{- define "runbell.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "runbell.fullname" -}}
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

{{- define "runbell.selectorLabels" -}}
app.kubernetes.io/name: {{ include "runbell.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "runbell.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "runbell.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "runbell.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "runbell.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- /* The Secret the gateway reads: yours, or the one this chart creates from secret.values. */}}
{{- define "runbell.secretName" -}}
{{- default (include "runbell.fullname" .) .Values.secret.existingSecret }}
{{- end }}

{{- /* Settings given through the Secret, or set by the chart itself: never through config. */}}
{{- define "runbell.reservedSettings" -}}
RUNBELL_TOKENS RUNBELL_TOKEN_SECRET RUNBELL_REDIS_URL RUNBELL_DATABASE_URL RUNBELL_AIRFLOW_TOKEN RUNBELL_AIRFLOW_PASSWORD RUNBELL_AIRFLOW_DATABASE_URL RUNBELL_NO_AUTH RUNBELL_HOST RUNBELL_PORT RUNBELL_SPOOL_DIR
{{- end }}
