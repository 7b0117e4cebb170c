{{/*
Names. Every object is named after the release, so that two releases in one cluster do
not collide (ClusterRoles, ClusterRoleBindings, the Lease, RoleBindings in the Pipelines'
namespaces, ...). <fullname> is the release name when it contains the chart name, else
"<release>-pipeline-controller"; fullnameOverride replaces it. With the release name
"pipeline-controller" the names are those of deploy/ (a test compares them).
*/}}
{{- define "pipeline-controller.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pipeline-controller.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "pipeline-controller.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The users' ClusterRoles: <fullname without "-controller">-viewer / -approver
(pipeline-viewer and pipeline-approver for the release "pipeline-controller"). */}}
{{- define "pipeline-controller.userRolePrefix" -}}
{{- include "pipeline-controller.fullname" . | trimSuffix "-controller" -}}
{{- end -}}

{{- define "pipeline-controller.namespace" -}}
{{- default .Release.Namespace .Values.namespace -}}
{{- end -}}

{{- define "pipeline-controller.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pipeline-controller.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: the existing ServiceAccount to bind and run as (serviceAccount.create is false)" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The leader-election Lease: passed as --lease-name and named in the Role's rule. */}}
{{- define "pipeline-controller.leaseName" -}}
{{- default (printf "%s-leader" (include "pipeline-controller.fullname" .)) .Values.leaderElection.leaseName -}}
{{- end -}}

{{- define "pipeline-controller.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* Selector labels: the release's pods only (two releases may share a namespace). */}}
{{- define "pipeline-controller.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pipeline-controller.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "pipeline-controller.labels" -}}
app.kubernetes.io/name: {{ include "pipeline-controller.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{- define "pipeline-controller.subject" -}}
- kind: ServiceAccount
  name: {{ include "pipeline-controller.serviceAccountName" . }}
  namespace: {{ include "pipeline-controller.namespace" . }}
{{- end -}}
