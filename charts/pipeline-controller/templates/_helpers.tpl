{{/* Name of every object; fixed so that it matches deploy/ and the approver docs. */}}
{{- define "pipeline-controller.name" -}}pipeline-controller{{- end -}}

{{- define "pipeline-controller.namespace" -}}
{{- default .Release.Namespace .Values.namespace -}}
{{- end -}}

{{/* Selector labels: the same as deploy/. */}}
{{- define "pipeline-controller.selectorLabels" -}}
app.kubernetes.io/name: pipeline-controller
app.kubernetes.io/component: controller
{{- end -}}

{{- define "pipeline-controller.labels" -}}
app.kubernetes.io/name: pipeline-controller
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pipeline-controller.subject" -}}
- kind: ServiceAccount
  name: pipeline-controller
  namespace: {{ include "pipeline-controller.namespace" . }}
{{- end -}}
