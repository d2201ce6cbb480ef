{{- define "datapath.labels" -}}
app.kubernetes.io/name: datapath
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "datapath.selector" -}}
app.kubernetes.io/name: datapath
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
